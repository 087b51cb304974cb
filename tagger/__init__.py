"""tagger: music auto-tagging on MagnaTagATune with Keras 3 and TensorFlow."""
import os

# oneDNN's CPU kernels. TensorFlow 2.16 turns them on by default only on CPUs with AVX-512 VNNI/BF16 or
# AMX; on an AVX2 CPU they alone train our CNN about 1.4 x faster, and our CRNN about 1.6 x faster
# together with tagger.models.TapGradientConv2D (python -m tagger.bench; README, Performance). They
# take effect only when tagger is imported before TensorFlow, as our commands do;
# TF_ENABLE_ONEDNN_OPTS=0 keeps TensorFlow's own kernels. No effect on GPUs. TAGGER_ONEDNN_DEFAULT=1
# tells our child processes that TF_ENABLE_ONEDNN_OPTS=1 is our default, not the user's choice; any
# other value of it (the user's, or 0 from a mirrored tagger.train) is kept.
ONEDNN_DEFAULTED = ("TF_ENABLE_ONEDNN_OPTS" not in os.environ
                    or (os.environ.get("TAGGER_ONEDNN_DEFAULT") == "1" and os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"))
if ONEDNN_DEFAULTED:
    os.environ.update(TF_ENABLE_ONEDNN_OPTS="1", TAGGER_ONEDNN_DEFAULT="1")
