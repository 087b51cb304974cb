"""Forward FLOPs of a model, counted layer by layer from its output shapes."""
import math

import keras
import numpy as np

from tagger.features import LogMelSpectrogram, Resample
from tagger.kernels import StridedConv1D


def forward_flops(model):
    """Multiply-adds x 2 of one forward pass of one model input (a clip, or one chunk or patch for the
    families that read pieces: `layout.pieces` gives the inputs per clip), nested models included: convolutions, dense layers, GRUs, the
    resampling filter, the STFT (5 N log2 N per frame) and the mel projection. Elementwise work (batch
    norm, activations, pooling) is left out."""
    def resampling(resample, input_shape):       # `width` multiply-adds per output sample
        return 2 * resample.width * int(np.prod(resample.compute_output_shape(input_shape)[1:]))

    total = 0
    for layer in model.layers:
        out = layer.output.shape
        if isinstance(layer, keras.Model):          # a nested network (musicnn's, on log-mel patches)
            total += forward_flops(layer)
        elif isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)):
            cin = layer.input.shape[-1]
            total += 2 * int(np.prod(layer.kernel_size)) * cin * layer.filters * int(np.prod(out[1:-1]))
        elif isinstance(layer, StridedConv1D):
            total += 2 * layer.length * layer.filters * int(np.prod(out[1:-1]))
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units * int(np.prod(out[1:-1] or [1]))
        elif isinstance(layer, keras.layers.GRU):
            steps, cin = layer.input.shape[1], layer.input.shape[2]
            total += steps * 3 * 2 * (cin * layer.units + layer.units * layer.units)
        elif isinstance(layer, Resample):
            total += resampling(layer, layer.input.shape)
        elif isinstance(layer, LogMelSpectrogram):
            frames, n = out[-1], layer.fft_length
            total += frames * (5 * n * math.log2(n) + 2 * (n // 2 + 1) * layer.num_mel_bins)
            if layer.resample is not None:
                total += resampling(layer.resample, layer.input.shape)
    return int(total)
