"""musicnn's own tagging, as the authors' code does it: what the conversion is tested against and the
benchmark's reference. Not used to tag anything.

`AuthorsGraph` is the inference part of musicnn's TensorFlow graph, imported from the wheel's .meta file
with the checkpoint's values; `musicnn_tags` is musicnn 0.1.0's extractor on one file: librosa at
16 kHz, its mel spectrogram rounded to float16, log10(10000 x + 1), non-overlapping 187-frame patches
(the partial last dropped), the graph, the mean over patches. librosa is a test requirement.
"""
import zipfile

PATCH_FRAMES = 187


class AuthorsGraph:
    """musicnn's inference graph up to model/Sigmoid, from the checkpoint folder's .meta file (the
    `_output_shapes` attributes dropped: with them the training nodes fail to import), with the
    checkpoint's values assigned to its variables. `features` names the penultimate layer's output:
    what the output layer's product takes (musicnn's extractor calls it "penultimate")."""

    def __init__(self, wheel, model_name):
        import tensorflow as tf
        from tensorflow.core.protobuf import meta_graph_pb2

        from tagger.convert import checkpoint_reader
        folder = f"musicnn/{model_name}"
        with zipfile.ZipFile(wheel) as z:
            meta = meta_graph_pb2.MetaGraphDef.FromString(z.read(f"{folder}/.meta"))
        for node in meta.graph_def.node:
            if "_output_shapes" in node.attr:
                del node.attr["_output_shapes"]
        graph_def = tf.compat.v1.graph_util.extract_sub_graph(meta.graph_def, ["model/Sigmoid"])
        self.variables = [n.name for n in graph_def.node if n.op == "VariableV2"]
        with checkpoint_reader(wheel, folder) as reader:
            self.shapes = reader.get_variable_to_shape_map()
            values = {name: reader.get_tensor(name) for name in self.variables}
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
            placeholders = [n for n in graph_def.node if n.op == "Placeholder"]
            of_type = {n.attr["dtype"].type: f"{n.name}:0" for n in placeholders}
            self.x, self.training = of_type[tf.float32.as_datatype_enum], of_type[tf.bool.as_datatype_enum]
            assigns = [tf.compat.v1.assign(self.graph.get_tensor_by_name(f"{name}:0"), value)
                       for name, value in values.items()]
            self.session = tf.compat.v1.Session(graph=self.graph)
            self.session.run(assigns)
        nodes = {n.name: n for n in graph_def.node}
        logits = nodes[nodes["model/Sigmoid"].input[0]]                      # the output layer's BiasAdd
        product = nodes[logits.input[0]]
        assert product.op == "MatMul", product
        self.features = product.input[0]                                      # what its MatMul multiplies

    def __call__(self, patches, output="model/Sigmoid"):
        """The graph's `output` (default: the probabilities) for log-mel patches (batch, 187, 96)."""
        return self.session.run(f"{output}:0", {self.x: patches, self.training: False})


def musicnn_patches(path, float16=True):
    """musicnn's input for a file: librosa at 16 kHz, the mel spectrogram (float16 as musicnn rounds
    it, unless float16=False), log10(10000 x + 1), non-overlapping 187-frame patches."""
    import librosa
    import numpy as np
    audio, sr = librosa.load(path, sr=16000)
    rep = librosa.feature.melspectrogram(y=audio, sr=sr, hop_length=256, n_fft=512, n_mels=96).T
    # musicnn rounds to float16; numpy 1 (musicnn's) then computed 10000 * x in float32, where numpy 2's
    # promotion rules would stay in float16 and overflow to inf: the float32 is spelled out.
    rep = np.log10(10000 * (rep.astype(np.float16).astype(np.float32) if float16 else rep) + 1)
    return np.stack([rep[t:t + PATCH_FRAMES] for t in range(0, rep.shape[0] - PATCH_FRAMES + 1, PATCH_FRAMES)])


def musicnn_tags(graph, path):
    """musicnn 0.1.0's tags for a file: the mean of its patches' probabilities."""
    return graph(musicnn_patches(path)).mean(axis=0)
