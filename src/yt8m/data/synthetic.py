"""A synthetic YouTube-8M corpus with the real formats and a learnable, realistic structure.

The generative model, in short:

- Classes: a Zipf prior (`p ∝ 1/rank^0.9`, class 0 the most frequent, as in the real
  vocabulary) and up to 24 verticals of unequal sizes named after the real ones.
- Labels: the first from the Zipf prior, the next ones (1 + Poisson(2.2) in all, at most 8)
  mostly from the same vertical. The stored labels add annotation noise: each true label is
  missing with probability 0.08, a spurious one is added with probability 0.05.
- Frames: a rank-64 latent space mapped to rgb (1024) and audio (128) by fixed random
  projections, plus per-value noise, then quantized like the real data. A video is a
  sequence of shots (4-30 frames, 60-300 frames in all); a class shot shows one of its
  class's 2-4 visual modes (with shot jitter, a drift through the shot and frame jitter
  along a few global nuisance directions); about 40% of the shots are uninformative (dark
  frames, title cards, unrelated content). 40% of the classes have an
  audio signature during their shots; otherwise the audio is the video's background.
- Segment ratings (validate/test segment partitions, videos of their own): for each
  whitelisted class a video shows, about 5 five-frame segments starting at multiples of 5,
  scored 1 when all 5 frames show the class and 0 when none does. Unlike the real test
  partition, the synthetic test segments keep their ratings.

Everything is a function of the arguments: the class structure of `(num_classes, seed)`,
each video of `(seed, partition, index)`, so the same call writes the same bytes; the
projections are computed exactly (see `_project`), so the bytes do not depend on the
machine's floating-point summation order either.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import math
import multiprocessing
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from yt8m.data.records import AUDIO_DIM, RGB_DIM, SEGMENT_LENGTH, quantize, write_examples

VERTICALS = (
    "Arts & Entertainment", "Games", "Autos & Vehicles", "Sports", "Food & Drink",
    "Computers & Electronics", "Business & Industrial", "Pets & Animals", "Hobbies & Leisure",
    "Beauty & Fitness", "Shopping", "Home & Garden", "Science", "Law & Government", "Travel",
    "Jobs & Education", "News", "Books & Literature", "Internet & Telecom", "People & Society",
    "Reference", "Health", "Finance", "Real Estate",
)
VOCABULARY_HEADER = ("Index", "TrainVideoCount", "KnowledgeGraphId", "Name", "WikiUrl",
                     "Vertical1", "Vertical2", "Vertical3", "WikiDescription")
# Per-video random streams: np.random.default_rng([seed, stream, index]).
_STREAMS = {("frame", "train"): 0, ("frame", "validate"): 1, ("frame", "test"): 2,
            ("segment", "validate"): 3, ("segment", "test"): 4}
_STRUCTURE_STREAM = 0xC1A55

MIN_FRAMES, MAX_FRAMES = 60, 300
WHITELIST_FRACTION = 1000 / 3862
ZIPF_EXPONENT = 0.9
MAX_LABELS = 8
EXTRA_LABELS_MEAN = 2.2  # labels a video: 1 + Poisson(2.2), at most MAX_LABELS
SAME_VERTICAL_PROB = 0.8
MISSING_LABEL_PROB = 0.08
SPURIOUS_LABEL_PROB = 0.05
LATENT_DIM, AUDIO_LATENT_DIM = 64, 16
UNINFORMATIVE_PROB = 0.4
CLASS_SHOT_LENGTHS = (10, 30)  # >= 9 frames: every complete class shot holds a 5-aligned segment
OTHER_SHOT_LENGTHS = (4, 20)
AUDIO_CUE_FRACTION = 0.4
RATINGS_PER_CLASS = 5
FEATURE_SCALE = 0.26  # frame = FEATURE_SCALE * projection(latent) + bias + noise
NOISE_STD = 0.2

_ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ID_SPACE = len(_ID_ALPHABET) ** 4
_ID_MULTIPLIER = 9_174_329  # coprime with 62**4: index -> id is a bijection

# Shot kinds.
CLASS, DARK, TITLE, UNRELATED = 0, 1, 2, 3
_SHOT_JITTER = np.array([0.45, 0.08, 0.15, 0.4], np.float32)
_SHOT_DRIFT = np.array([0.3, 0.0, 0.0, 0.3], np.float32)
NUISANCE_DIM = 4  # frame jitter: N(0, 1) along 4 fixed latent directions (camera, light...)
_FRAME_JITTER = 0.1  # per latent value of each nuisance direction

# Gaussian noise by table look-up of random bytes: 256 quantiles of N(0, NOISE_STD).
_NOISE_TABLE = np.array([statistics.NormalDist(0.0, NOISE_STD).inv_cdf((i + 0.5) / 256) for i in range(256)],
                        np.float32)


# ----------------------------------------------------------------------------- class structure


@dataclass(frozen=True, eq=False)
class ClassStructure:
    """Everything shared by the videos of one corpus: a function of `(num_classes, seed)`."""

    num_classes: int
    prior: np.ndarray            # [C] Zipf class prior, decreasing with the class index
    vertical_of: np.ndarray      # [C] vertical index of each class
    vertical_names: tuple[str, ...]  # [V], largest vertical first
    vertical_members: tuple[np.ndarray, ...] = field(repr=False)  # [V] class ids of each vertical
    whitelist: np.ndarray        # sorted ids of the segment-rated classes
    num_modes: np.ndarray        # [C] visual modes per class (2-4)
    mode_latents: np.ndarray     # [C, 4, LATENT_DIM]
    audio_cue: np.ndarray        # [C] bool: the class has an audio signature
    audio_latents: np.ndarray    # [C, AUDIO_LATENT_DIM]
    dark_latent: np.ndarray      # [LATENT_DIM]: the fixed, faint look of dark frames
    title_latent: np.ndarray     # [LATENT_DIM]: the fixed look of title cards
    rgb_projection: np.ndarray   # [LATENT_DIM, RGB_DIM]
    nuisance_projection: np.ndarray  # [NUISANCE_DIM, RGB_DIM]: the nuisance directions, projected
    audio_projection: np.ndarray  # [AUDIO_LATENT_DIM, AUDIO_DIM]
    rgb_bias: np.ndarray         # [RGB_DIM]
    audio_bias: np.ndarray       # [AUDIO_DIM]
    _prior_cdf: np.ndarray = field(repr=False)
    _vertical_cdfs: tuple[np.ndarray, ...] = field(repr=False)
    _whitelist_cdf: np.ndarray = field(repr=False)

    @property
    def num_verticals(self) -> int:
        return len(self.vertical_names)


def make_structure(num_classes: int, seed: int = 0) -> ClassStructure:
    """The class structure (priors, verticals, whitelist, visual modes, projections) of a corpus."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng([seed, _STRUCTURE_STREAM, num_classes])
    prior = 1.0 / np.arange(1, num_classes + 1) ** ZIPF_EXPONENT
    prior /= prior.sum()

    num_verticals = max(1, min(len(VERTICALS), num_classes // 5))  # at least 5 classes a vertical
    weights = rng.lognormal(0.0, 0.3, num_verticals) / np.arange(1, num_verticals + 1) ** 0.6
    sizes = 1 + rng.multinomial(num_classes - num_verticals, weights / weights.sum())
    sizes = np.sort(sizes)[::-1]
    vertical_of = np.empty(num_classes, np.int64)
    vertical_of[rng.permutation(num_classes)] = np.repeat(np.arange(num_verticals), sizes)
    members = tuple(np.flatnonzero(vertical_of == v) for v in range(num_verticals))

    num_white = max(1, round(num_classes * WHITELIST_FRACTION))
    whitelist = np.sort(rng.choice(num_classes, num_white, replace=False))

    # Latents: vertical centre + class centre + mode offsets centred on the class, so that a
    # class's mean look is weaker than each of its modes.
    vertical_centres = 0.6 * rng.standard_normal((num_verticals, LATENT_DIM))
    class_centres = vertical_centres[vertical_of] + 0.6 * rng.standard_normal((num_classes, LATENT_DIM))
    num_modes = rng.integers(2, 5, num_classes)
    offsets = 0.9 * rng.standard_normal((num_classes, 4, LATENT_DIM))
    used = np.arange(4)[None, :] < num_modes[:, None]  # [C, 4]
    offsets -= (offsets * used[..., None]).sum(1, keepdims=True) / num_modes[:, None, None]
    mode_latents = (class_centres[:, None, :] + offsets).astype(np.float32)

    audio_cue = rng.random(num_classes) < AUDIO_CUE_FRACTION
    audio_latents = rng.standard_normal((num_classes, AUDIO_LATENT_DIM)).astype(np.float32)
    dark_latent, title_latent = (scale * rng.standard_normal(LATENT_DIM) for scale in (0.4, 1.3))
    rgb_projection = FEATURE_SCALE / math.sqrt(LATENT_DIM) * rng.standard_normal((LATENT_DIM, RGB_DIM))
    nuisance = _FRAME_JITTER * rng.standard_normal((NUISANCE_DIM, LATENT_DIM))
    audio_projection = _projection_grid(1.6 * FEATURE_SCALE / math.sqrt(AUDIO_LATENT_DIM)
                                        * rng.standard_normal((AUDIO_LATENT_DIM, AUDIO_DIM)))
    return ClassStructure(
        num_classes=num_classes,
        prior=prior,
        vertical_of=vertical_of,
        vertical_names=VERTICALS[:num_verticals],
        vertical_members=members,
        whitelist=whitelist,
        num_modes=num_modes,
        mode_latents=mode_latents,
        audio_cue=audio_cue,
        audio_latents=audio_latents,
        dark_latent=dark_latent.astype(np.float32),
        title_latent=title_latent.astype(np.float32),
        rgb_projection=_projection_grid(rgb_projection),
        nuisance_projection=_projection_grid(nuisance @ rgb_projection),
        audio_projection=audio_projection,
        rgb_bias=(0.1 * rng.standard_normal(RGB_DIM)).astype(np.float32),
        audio_bias=(0.1 * rng.standard_normal(AUDIO_DIM)).astype(np.float32),
        _prior_cdf=np.cumsum(prior),
        _vertical_cdfs=tuple(np.cumsum(prior[m]) for m in members),
        _whitelist_cdf=np.cumsum(prior[whitelist]),
    )


# ----------------------------------------------------------------------------- one video


@dataclass(eq=False)
class SyntheticVideo:
    """One generated video with its ground truth."""

    id: str
    content_labels: np.ndarray   # int64, sorted: the classes the frames show
    labels: np.ndarray           # int64, sorted: the stored (noisy) labels
    rgb: np.ndarray              # uint8 [T, 1024]
    audio: np.ndarray            # uint8 [T, 128]
    frame_class: np.ndarray      # int64 [T]: the class a frame shows, -1 for uninformative frames
    segment_start_times: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    segment_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    segment_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    @property
    def num_frames(self) -> int:
        return self.rgb.shape[0]

    def frame_example(self, with_labels: bool = True) -> dict:
        labels = self.labels if with_labels else np.zeros(0, np.int64)
        return {"id": self.id, "labels": labels, "rgb": self.rgb, "audio": self.audio}

    def video_example(self, with_labels: bool = True) -> dict:
        """Video level: the mean over all frames of the dequantized frame features."""
        labels = self.labels if with_labels else np.zeros(0, np.int64)
        return {"id": self.id, "labels": labels, "mean_rgb": _dequantized_mean(self.rgb),
                "mean_audio": _dequantized_mean(self.audio)}

    def segment_example(self) -> dict:
        """Segment-rated frame record: no video-level labels, as in the real partition."""
        return {**self.frame_example(with_labels=False),
                "segment_start_times": self.segment_start_times,
                "segment_labels": self.segment_labels,
                "segment_scores": self.segment_scores}


def _dequantized_mean(q: np.ndarray) -> np.ndarray:
    # mean(q * a + b) = mean(q) * a + b, summed exactly in integers
    mean_q = q.sum(axis=0, dtype=np.int64) / q.shape[0]
    return (mean_q * (4.0 / 255.0) + (4.0 / 512.0 - 2.0)).astype(np.float32)


def _draw(rng: np.random.Generator, cdf: np.ndarray) -> int:
    return int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))


def _draw_new(rng: np.random.Generator, cdf: np.ndarray, taken: list[int], items: np.ndarray | None = None) -> int:
    """A class from `cdf` (over `items`, default all classes) that is not in `taken`; -1 if none is left."""
    if len(cdf) == (len(taken) if items is None else np.isin(items, taken).sum()):
        return -1
    while True:
        i = _draw(rng, cdf)
        c = i if items is None else int(items[i])
        if c not in taken:
            return c


def _draw_content_labels(s: ClassStructure, rng: np.random.Generator, rated: bool) -> list[int]:
    """First label from the prior (the whitelisted prior for rated videos), the rest mostly same-vertical."""
    first = int(s.whitelist[_draw(rng, s._whitelist_cdf)]) if rated else _draw(rng, s._prior_cdf)
    labels = [first]
    count = min(1 + int(rng.poisson(EXTRA_LABELS_MEAN)), MAX_LABELS, s.num_classes)
    vertical = s.vertical_of[first]
    while len(labels) < count:
        label = -1
        if rng.random() < SAME_VERTICAL_PROB:
            label = _draw_new(rng, s._vertical_cdfs[vertical], labels, s.vertical_members[vertical])
        if label < 0:
            label = _draw_new(rng, s._prior_cdf, labels)
        labels.append(label)
    return labels


def _noisy_labels(s: ClassStructure, rng: np.random.Generator, content: list[int]) -> np.ndarray:
    kept = [c for c in content if rng.random() >= MISSING_LABEL_PROB] or content[:1]
    if rng.random() < SPURIOUS_LABEL_PROB:
        spurious = _draw_new(rng, s._prior_cdf, content)
        if spurious >= 0:
            kept.append(spurious)
    return np.array(sorted(kept), np.int64)


# Exact projections: latents on a 2^-8 grid in [-8, 8] times projection entries on a 2^-10
# grid with |p| <= 8 / rank give products on a 2^-18 grid and partial sums of magnitude <= 64
# = 2^(24 - 18), all exact in float32, whatever the summation order. einsum, not BLAS: these
# products are too small to gain from BLAS threads, and lose much to them on a busy machine.
_LATENT_STEP, _PROJECTION_STEP, _LATENT_BOUND = 2.0 ** -8, 2.0 ** -10, 8.0


def _projection_grid(projection: np.ndarray) -> np.ndarray:
    bound = _LATENT_BOUND / projection.shape[0]
    return np.clip(np.round(projection / _PROJECTION_STEP) * _PROJECTION_STEP, -bound, bound).astype(np.float32)


def _project(latent: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """`latent @ projection`, exactly (projection from `_projection_grid`)."""
    latent = np.clip(np.round(latent * (1 / _LATENT_STEP)) * _LATENT_STEP, -_LATENT_BOUND, _LATENT_BOUND)
    return np.einsum("tr,rd->td", latent.astype(np.float32), projection, optimize=False)


def _noise(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    size = shape[0] * shape[1]
    random_bytes = rng.bit_generator.random_raw(-(-size // 8)).view(np.uint8)[:size]
    return np.take(_NOISE_TABLE, random_bytes).reshape(shape)


def generate_video(structure: ClassStructure, rng: np.random.Generator, video_id: str = "",
                   rated: bool = False) -> SyntheticVideo:
    """One video drawn from `rng`; `rated` adds segment ratings (and a whitelisted first label)."""
    s = structure
    content = _draw_content_labels(s, rng, rated)

    # Shots: kinds and lengths for more shots than can fit, then cut at the drawn length.
    target = int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1))
    max_shots = MAX_FRAMES // OTHER_SHOT_LENGTHS[0] + 1
    kinds = np.where(rng.random(max_shots) < UNINFORMATIVE_PROB,  # unrelated content half the time
                     rng.choice([DARK, TITLE, UNRELATED, UNRELATED], max_shots), CLASS)
    # The first label's shot is one of the first target // 30 shots: always complete.
    anchor = int(rng.integers(0, target // CLASS_SHOT_LENGTHS[1]))
    kinds[anchor] = CLASS
    lengths = np.where(kinds == CLASS, rng.integers(CLASS_SHOT_LENGTHS[0], CLASS_SHOT_LENGTHS[1] + 1, max_shots),
                       rng.integers(OTHER_SHOT_LENGTHS[0], OTHER_SHOT_LENGTHS[1] + 1, max_shots))
    ends = np.cumsum(lengths)
    num_shots = int(np.searchsorted(ends, target)) + 1
    num_frames = min(int(ends[num_shots - 1]), MAX_FRAMES)
    kinds, lengths, starts = kinds[:num_shots], lengths[:num_shots], (ends - lengths)[:num_shots]
    lengths[-1] = num_frames - starts[-1]

    # Class shots: each content label at least once (the first on the anchor); labels left
    # without a shot are not in the video; the other class shots repeat its labels.
    class_shots = np.flatnonzero(kinds == CLASS)
    order = np.concatenate([[anchor], rng.permutation(class_shots[class_shots != anchor])])
    content = content[:len(order)]
    labels = _noisy_labels(s, rng, content)
    shot_class = np.full(num_shots, -1, np.int64)
    shot_class[order[:len(content)]] = content
    shot_class[order[len(content):]] = np.asarray(content)[rng.integers(0, len(content), len(order) - len(content))]
    is_class = shot_class >= 0
    shot_mode = (rng.random(num_shots) * s.num_modes[np.maximum(shot_class, 0)]).astype(np.int64)

    base = np.empty((num_shots, LATENT_DIM), np.float32)  # [S, R]
    base[is_class] = s.mode_latents[shot_class[is_class], shot_mode[is_class]]
    base[kinds == DARK] = s.dark_latent
    base[kinds == TITLE] = s.title_latent
    base[kinds == UNRELATED] = 1.2 * rng.standard_normal((int(np.sum(kinds == UNRELATED)), LATENT_DIM))
    shot_latent = base + _SHOT_JITTER[kinds, None] * rng.standard_normal((num_shots, LATENT_DIM), np.float32)
    drift = _SHOT_DRIFT[kinds, None] * rng.standard_normal((num_shots, LATENT_DIM), np.float32)

    frame_shot = np.repeat(np.arange(num_shots), lengths)  # [T]
    position = ((np.arange(num_frames) - starts[frame_shot]) / lengths[frame_shot] - 0.5).astype(np.float32)
    # frame latent = shot latent + position * drift + frame jitter along the nuisance directions;
    # projected by parts: the shots' rows, then gathered per frame
    shot_rgb = _project(np.concatenate([shot_latent, drift]), s.rgb_projection)  # [2S, 1024]
    rgb = shot_rgb[frame_shot]  # [T, 1024]
    rgb += position[:, None] * shot_rgb[num_shots + frame_shot]
    rgb += _project(rng.standard_normal((num_frames, NUISANCE_DIM), np.float32), s.nuisance_projection)
    rgb += s.rgb_bias
    rgb += _noise(rng, (num_frames, RGB_DIM))
    rgb = quantize(rgb)

    frame_class = shot_class[frame_shot]  # [T]
    background = 0.8 * rng.standard_normal(AUDIO_LATENT_DIM, np.float32)
    cue = (frame_class >= 0) & s.audio_cue[np.maximum(frame_class, 0)]
    audio_latent = np.where(cue[:, None], s.audio_latents[np.maximum(frame_class, 0)], background)
    audio_latent += 0.4 * rng.standard_normal((num_frames, AUDIO_LATENT_DIM), np.float32)  # [T, Ra]
    audio = quantize(_project(audio_latent, s.audio_projection) + s.audio_bias + _noise(rng, (num_frames, AUDIO_DIM)))

    video = SyntheticVideo(id=video_id, content_labels=np.array(sorted(content), np.int64), labels=labels,
                           rgb=rgb, audio=audio, frame_class=frame_class)
    if rated:
        _rate_segments(s, rng, video)
    return video


def _rate_segments(s: ClassStructure, rng: np.random.Generator, video: SyntheticVideo) -> None:
    """About 5 rated 5-frame segments per whitelisted class shown: positives and negatives."""
    num_segments = video.num_frames // SEGMENT_LENGTH
    windows = video.frame_class[:num_segments * SEGMENT_LENGTH].reshape(num_segments, SEGMENT_LENGTH)
    starts, classes, scores = [], [], []
    for c in video.content_labels[np.isin(video.content_labels, s.whitelist)]:
        shows = windows == c
        positives = np.flatnonzero(shows.all(axis=1))
        negatives = np.flatnonzero(~shows.any(axis=1))
        num_pos = min(len(positives), int(rng.integers(1, 4)))
        num_neg = min(len(negatives), RATINGS_PER_CLASS - num_pos)
        chosen = np.sort(np.concatenate([rng.choice(positives, num_pos, replace=False),
                                         rng.choice(negatives, num_neg, replace=False)]))
        starts.append(chosen * SEGMENT_LENGTH)
        classes.append(np.full(len(chosen), c, np.int64))
        scores.append(np.isin(chosen, positives).astype(np.float32))
    video.segment_start_times = np.concatenate(starts).astype(np.int64)
    video.segment_labels = np.concatenate(classes)
    video.segment_scores = np.concatenate(scores)


def video_id(index: int, seed: int = 0) -> str:
    """A 4-character base-62 id, a bijection of `index` in [0, 62**4) for a given seed."""
    if not 0 <= index < _ID_SPACE:
        raise ValueError(f"video index must be in [0, {_ID_SPACE}), got {index}")
    n = (index * _ID_MULTIPLIER + seed * 7_919 + 1_234_567) % _ID_SPACE
    chars = []
    for _ in range(4):
        n, digit = divmod(n, len(_ID_ALPHABET))
        chars.append(_ID_ALPHABET[digit])
    return "".join(reversed(chars))


# ----------------------------------------------------------------------------- the corpus


@dataclass
class SynthInfo:
    """What `synthesize` wrote."""

    out_dir: Path
    num_classes: int
    seed: int
    whitelist: tuple[int, ...]
    num_videos: dict[str, int]          # frame/video level, per split
    num_segment_videos: dict[str, int]  # segment level, per split
    files: dict[str, dict[str, list[Path]]]  # files[level][split]
    vocabulary: Path
    segment_label_ids: Path


@dataclass(frozen=True)
class _Shard:
    level: str  # "frame" (frame + video files) or "segment"
    split: str
    shard: int
    start: int  # index range in the partition
    stop: int
    id_offset: int  # global index of the partition's first video

    @property
    def name(self) -> str:
        return f"{self.split}{self.shard:04d}.tfrecord"


def _split_counts(num_videos: int, splits: tuple[float, float, float]) -> dict[str, int]:
    num_train = round(num_videos * splits[0])
    num_validate = min(round(num_videos * splits[1]), num_videos - num_train)
    return {"train": num_train, "validate": num_validate, "test": num_videos - num_train - num_validate}


def _validate(num_videos: int, num_classes: int, seed: int, shard_size: int, splits: tuple[float, ...],
              num_segment_videos: int, workers: int) -> None:
    minimums = {"num_videos": (num_videos, 1), "num_classes": (num_classes, 2), "seed": (seed, 0),
                "shard_size": (shard_size, 1), "num_segment_videos": (num_segment_videos, 0), "workers": (workers, 1)}
    for name, (value, minimum) in minimums.items():
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if len(splits) != 3 or any(f < 0 for f in splits) or abs(sum(splits) - 1.0) > 1e-6:
        raise ValueError(f"splits must be 3 non-negative fractions (train, validate, test) summing to 1, "
                         f"got {tuple(splits)}")
    if num_videos + num_segment_videos > _ID_SPACE:
        raise ValueError(f"at most {_ID_SPACE} videos in all (4-character ids), "
                         f"got {num_videos + num_segment_videos}")


def _output_paths(out_dir: Path) -> list[Path]:
    found = [out_dir / name for name in ("vocabulary.csv", "segment_label_ids.csv") if (out_dir / name).exists()]
    for level in ("frame", "video", "segment"):
        found.extend(sorted((out_dir / level).glob("*.tfrecord")))
    return found


_structure = functools.lru_cache(maxsize=1)(make_structure)  # one per process, workers included


def _write_shard(out_dir: Path, num_classes: int, seed: int, job: _Shard) -> np.ndarray:
    """Write one shard (frame + video files, or a segment file); returns its stored-label counts."""
    structure = _structure(num_classes, seed)
    stream = _STREAMS[(job.level, job.split)]
    label_counts = np.zeros(num_classes, np.int64)

    def videos():
        for index in range(job.start, job.stop):
            rng = np.random.default_rng([seed, stream, index])
            video = generate_video(structure, rng, video_id(job.id_offset + index, seed), rated=job.level == "segment")
            label_counts[video.labels] += 1
            yield video

    if job.level == "segment":
        write_examples(out_dir / "segment" / job.name, (v.segment_example() for v in videos()), "segment")
        return label_counts
    with_labels = job.split != "test"
    video_examples = []

    def frame_examples():
        for video in videos():
            video_examples.append(video.video_example(with_labels))
            yield video.frame_example(with_labels)

    write_examples(out_dir / "frame" / job.name, frame_examples(), "frame")
    write_examples(out_dir / "video" / job.name, video_examples, "video")
    return label_counts


def _write_csvs(out_dir: Path, structure: ClassStructure, train_counts: np.ndarray) -> None:
    width = max(4, len(str(structure.num_classes - 1)))
    with open(out_dir / "vocabulary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(VOCABULARY_HEADER)
        for c in range(structure.num_classes):
            vertical = structure.vertical_names[structure.vertical_of[c]]
            writer.writerow([c, int(train_counts[c]), f"/m/syn{c:0{width}d}", f"Class {c:0{width}d} ({vertical})",
                             "", vertical, "", "", f"Synthetic class {c} of the {vertical} vertical."])
    with open(out_dir / "segment_label_ids.csv", "w", newline="", encoding="utf-8") as f:
        f.write("Index\n" + "".join(f"{c}\n" for c in structure.whitelist))


def synthesize(
    out_dir: str | os.PathLike,
    num_videos: int = 1000,
    num_classes: int = 200,
    seed: int = 0,
    shard_size: int = 128,
    splits: tuple[float, float, float] = (0.7, 0.2, 0.1),
    num_segment_videos: int | None = None,
    progress: bool = True,
    workers: int = 1,
    overwrite: bool = False,
) -> SynthInfo:
    """Write a synthetic corpus: frame/, video/, segment/ TFRecords, vocabulary.csv, segment_label_ids.csv.

    `num_videos` are split into train/validate/test by `splits` (frame and video level, the
    test split without labels); `num_segment_videos` (default num_videos // 10) more videos
    are segment-rated and split half and half into segment/validate* and segment/test*.
    Files hold `shard_size` videos each (a split with no videos has no files). The bytes
    depend on the arguments only, not on `workers` (spawned processes writing shards in
    parallel). Existing outputs in `out_dir` raise FileExistsError unless `overwrite`, which
    deletes them first.
    """
    if num_segment_videos is None:
        num_segment_videos = num_videos // 10
    splits = tuple(float(f) for f in splits)
    _validate(num_videos, num_classes, seed, shard_size, splits, num_segment_videos, workers)
    out_dir = Path(out_dir)
    existing = _output_paths(out_dir)
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a corpus ({existing[0]}, ...); pass --overwrite "
                              "(overwrite=True) to replace it")
    for path in existing:
        path.unlink()
    structure = _structure(num_classes, seed)

    counts = _split_counts(num_videos, splits)
    num_seg_validate = (num_segment_videos + 1) // 2
    segment_counts = {"validate": num_seg_validate, "test": num_segment_videos - num_seg_validate}
    jobs, offset = [], 0
    for level, partition in (("frame", counts), ("segment", segment_counts)):
        for split, count in partition.items():
            for shard, start in enumerate(range(0, count, shard_size)):
                jobs.append(_Shard(level, split, shard, start, min(start + shard_size, count), offset))
            offset += count
    for level in ("frame", "video", "segment"):
        (out_dir / level).mkdir(parents=True, exist_ok=True)

    train_counts = np.zeros(num_classes, np.int64)
    bar = tqdm(total=num_videos + num_segment_videos, unit="video", desc="synthesizing", disable=not progress)
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    with bar, executor or contextlib.nullcontext():
        write = functools.partial(_write_shard, out_dir, num_classes, seed)
        for job, label_counts in zip(jobs, executor.map(write, jobs) if executor else map(write, jobs)):
            if job.level == "frame" and job.split == "train":
                train_counts += label_counts
            bar.update(job.stop - job.start)
    _write_csvs(out_dir, structure, train_counts)

    files: dict[str, dict[str, list[Path]]] = {level: {} for level in ("frame", "video", "segment")}
    for job in jobs:
        for level in (("segment",) if job.level == "segment" else ("frame", "video")):
            files[level].setdefault(job.split, []).append(out_dir / level / job.name)
    return SynthInfo(out_dir=out_dir, num_classes=num_classes, seed=seed,
                     whitelist=tuple(int(c) for c in structure.whitelist), num_videos=counts,
                     num_segment_videos=segment_counts, files=files, vocabulary=out_dir / "vocabulary.csv",
                     segment_label_ids=out_dir / "segment_label_ids.csv")

