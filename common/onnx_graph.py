"""Export-time rewrites that make the ONNX graph cheaper to run without changing what it computes.

Why: on an edge CPU the log-mel CNN spends about 40 % of its time in the front end's DFT, a
``conv1d`` with ``2 * (n_fft / 2 + 1)`` Hann-windowed cosine/sine kernels of length ``n_fft``.
ONNX's own ``STFT`` operator would be the obvious replacement, but ONNX Runtime 1.32 runs it
12x slower than that convolution for ``n_fft = 400`` (not a power of two: 16.9 ms vs 1.36 ms on
3 s of audio, one thread, ``benchmarks/results/edge.md``), so the convolution stays a matrix
product and the rewrite below halves the products instead.

The periodic Hann window and the DFT kernels are symmetric around ``n_fft / 2``:
``w[N - t] = w[t]``, ``cos(2 pi k (N - t) / N) = cos(2 pi k t / N)`` and the sine flips sign. So
the real part of bin ``k`` only needs the folded frame ``e[t] = x[t] + x[N - t]`` (``N/2 + 1``
values) and the imaginary part ``o[t] = x[t] - x[N - t]`` (``N/2 - 1`` values; the sine rows of
bins ``0`` and ``N/2`` are zero). Two matrix products of ``(N/2+1)^2`` and ``(N/2-1)^2``
multiply-adds per frame replace one of ``(N+2) * N``: half the arithmetic, same function up to
float rounding. The swap happens on the exported copy only, like :class:`serforget.common.onnx_export`'s
GroupNorm swap, and the export's parity check compares the result with the unmodified model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from serforget.common.models.frontend import LogMel

#: Largest |K[k, t] - K[k, N - t]| (cosine rows) or |K[k, t] + K[k, N - t]| (sine rows) at
#: which the kernels count as symmetric; float32 rounding of the float64-built kernels is ~1e-7.
_SYMMETRY_TOLERANCE = 1e-5


class FoldedDftLogMel(nn.Module):
    """:class:`LogMel` computed from symmetric-folded frames: same output, half the DFT products.

    Framing uses only reshapes, slices and concatenation (``hop``-sample blocks glued together),
    so the graph has no ``unfold``/gather and keeps both input axes dynamic.
    """

    def __init__(self, frontend: LogMel) -> None:
        super().__init__()
        n_fft, hop = frontend.n_fft, frontend.hop_length
        if n_fft % 2 or n_fft < 4:
            raise ValueError(f"the folded DFT needs an even n_fft >= 4, got {n_fft}")
        self.n_fft, self.hop_length, self.log_floor = n_fft, hop, frontend.log_floor
        half = n_fft // 2
        kernels = frontend.dft_kernels.detach().squeeze(1).to(torch.float64)  # [2 * (half + 1), n_fft]
        cos, sin = kernels[: half + 1], kernels[half + 1 :]
        mirrored = torch.arange(n_fft - 1, half, -1)  # N - t for t = 1 .. half - 1
        inner = torch.arange(1, half)
        if (cos[:, inner] - cos[:, mirrored]).abs().max() > _SYMMETRY_TOLERANCE or (
            (sin[:, inner] + sin[:, mirrored]).abs().max() > _SYMMETRY_TOLERANCE
            or sin[:, [0, half]].abs().max() > _SYMMETRY_TOLERANCE
            or sin[[0, half]].abs().max() > _SYMMETRY_TOLERANCE
        ):
            raise ValueError("the front end's DFT kernels are not symmetric (not a periodic symmetric window?)")
        # even[t] (t = 0..half) and odd[t] (t = 1..half-1) -> real part of bins 0..half, imaginary of 1..half-1
        self.register_buffer(
            "cos_fold", cos[:, : half + 1].T.contiguous().to(torch.float32), persistent=False
        )  # [half+1, half+1]
        self.register_buffer(
            "sin_fold", sin[1:half, 1:half].T.contiguous().to(torch.float32), persistent=False
        )  # [half-1, half-1]
        self.register_buffer("mel_fbanks_t", frontend.mel_fbanks.T.contiguous(), persistent=False)  # [half+1, n_mels]
        self.blocks_per_frame = math.ceil(n_fft / hop)

    def _frames(self, waveform: torch.Tensor) -> torch.Tensor:
        """``[batch, frames, n_fft]`` frames of the reflect-padded signal (``torch.stft(center=True)``)."""
        pad, hop, k = self.n_fft // 2, self.hop_length, self.blocks_per_frame
        padded = nn.functional.pad(waveform.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        n_frames = waveform.shape[1] // hop + 1
        # enough zeros at the end that n_frames + k - 1 whole blocks exist; they only reach past n_fft
        padded = nn.functional.pad(padded, (0, k * hop))
        blocks = padded[:, : (n_frames + k - 1) * hop].reshape(waveform.shape[0], n_frames + k - 1, hop)
        frames = torch.cat([blocks[:, j : j + n_frames] for j in range(k)], dim=2)
        return frames[:, :, : self.n_fft]

    def power_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """Mel power spectrogram ``[batch, n_mels, frames]``, as :meth:`LogMel.power_mel`."""
        half = self.n_fft // 2
        frames = self._frames(waveform)
        mirrored = frames[:, :, half + 1 :].flip(-1)  # x[N - t] for t = 1 .. half - 1
        even = torch.cat([frames[:, :, :1], frames[:, :, 1:half] + mirrored, frames[:, :, half : half + 1]], dim=2)
        odd = frames[:, :, 1:half] - mirrored
        real = torch.matmul(even, self.cos_fold)
        imag = torch.matmul(odd, self.sin_fold)
        power = real * real + nn.functional.pad(imag * imag, (1, 1))
        return torch.matmul(power, self.mel_fbanks_t).transpose(1, 2)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.log(self.power_mel(waveform) + self.log_floor)


def use_folded_dft(model: nn.Module) -> int:
    """Swap every :class:`LogMel` of ``model`` (the export copy) for :class:`FoldedDftLogMel`; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LogMel):
                setattr(parent, name, FoldedDftLogMel(child))
                swapped += 1
    return swapped
