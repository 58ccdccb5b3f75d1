"""In-memory waveform sets: the tensors that training, evaluation and unlearning consume.

Why in memory: SER corpora per speaker (a node) or per split are small (minutes to hours of
16 kHz audio), and decoding + resampling every epoch would dominate CPU time on a device.
Clips are cut to a fixed length with :func:`serforget.common.audio.fix_length` (centre crop / end pad).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from serforget.common.audio import SAMPLE_RATE, fix_length, load_audio
from serforget.common.manifest import Utterance

DEFAULT_CLIP_SECONDS = 3.0


@dataclass
class WaveformSet:
    """``waves[N, samples]`` with integer ``targets[N]`` and the ids they came from."""

    waves: torch.Tensor
    targets: torch.Tensor
    utt_ids: list[str]
    speakers: list[str]

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def subset(self, index: Sequence[int] | torch.Tensor) -> "WaveformSet":
        idx = torch.as_tensor(index, dtype=torch.long)
        return WaveformSet(
            waves=self.waves[idx],
            targets=self.targets[idx],
            utt_ids=[self.utt_ids[i] for i in idx.tolist()],
            speakers=[self.speakers[i] for i in idx.tolist()],
        )

    def select_ids(self, utt_ids: Sequence[str]) -> "WaveformSet":
        """Rows for the given utterance ids, in that order; unknown ids are an error."""
        position = {u: i for i, u in enumerate(self.utt_ids)}
        unknown = [u for u in utt_ids if u not in position]
        if unknown:
            raise KeyError(f"utterance ids not in this set: {unknown[:5]}")
        return self.subset([position[u] for u in utt_ids])

    def exclude_ids(self, utt_ids: Sequence[str]) -> "WaveformSet":
        drop = set(utt_ids)
        return self.subset([i for i, u in enumerate(self.utt_ids) if u not in drop])


def load_waveforms(
    utterances: Sequence[Utterance],
    *,
    labels: Sequence[str],
    clip_seconds: float = DEFAULT_CLIP_SECONDS,
    sample_rate: int = SAMPLE_RATE,
    progress: bool = False,
) -> WaveformSet:
    """Decode, resample and fix the length of every utterance; labels map to indices of ``labels``."""
    index = {lab: i for i, lab in enumerate(labels)}
    n_samples = int(round(clip_seconds * sample_rate))
    waves, targets = [], []
    for utt in tqdm(utterances, desc="loading audio", unit="utt", disable=not progress, leave=False):
        if utt.emotion not in index:
            raise ValueError(f"{utt.path}: emotion {utt.emotion!r} is not one of the task labels {list(labels)}")
        waves.append(fix_length(load_audio(utt.path, sample_rate=sample_rate), n_samples))
        targets.append(index[utt.emotion])
    return WaveformSet(
        waves=torch.stack(waves) if waves else torch.zeros(0, n_samples),
        targets=torch.tensor(targets, dtype=torch.long),
        utt_ids=[u.utt_id for u in utterances],
        speakers=[u.speaker for u in utterances],
    )
