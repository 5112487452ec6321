"""Session-scoped fixtures shared by every part's tests: tiny trained checkpoints and a repository built from them.

`tiny_checkpoints`: arch -> checkpoint folder, for "lstm", "gru", "birnn-lstm", "transformer" (translators trained for a
few seconds on reversing letter sequences, "a c b" -> "b c a", joint BPE vocabulary) and "bert" (MLM + NSP heads,
trained on models/synthetic.py's documents, BPE vocabulary).

`tiny_repository`: a model repository (a folder; treat it as read-only, copy it to change it) holding version 1 of
tiny-lstm, tiny-gru, tiny-birnn, tiny-transformer, tiny-bert, and the int8 variants tiny-lstm-int8 and
tiny-bert-int8, all exported through seqserve.export with their parity and quality gates.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

TRANSLATOR_ARCHS = ("lstm", "gru", "birnn-lstm", "transformer")
REPOSITORY_NAMES = {"lstm": "tiny-lstm", "gru": "tiny-gru", "birnn-lstm": "tiny-birnn",
                    "transformer": "tiny-transformer", "bert": "tiny-bert"}  # fmt: skip
TRAIN_STEPS = 150  # enough for sensible reversals (dev BLEU ~40-85) in ~3 s a model
SEED = 1


def gpu_available() -> bool:
    """A GPU for export and serving: onnxruntime lists its CUDA provider and torch sees a device."""
    import onnxruntime as ort
    import torch

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def cuda_starts(graph: Path) -> bool:
    """Whether plain onnxruntime runs a session of `graph` on CUDA here: False without the provider, and where
    onnxruntime-gpu lists it but cannot load its CUDA libraries (it then falls back to the CPU)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ort.InferenceSession(str(graph), providers=providers).get_providers()[0] == "CUDAExecutionProvider"


def tiny_dev_pairs() -> list[tuple[str, str]]:
    """The dev pairs of the tiny translators' task (held out from training)."""
    from seqserve.models.synthetic import reversal_pairs

    return reversal_pairs(100, SEED + 1000)


def tiny_documents() -> list[list[str]]:
    """Documents of the tiny BERT's domain (not the ones it was trained on)."""
    from seqserve.models.synthetic import synthetic_documents

    return synthetic_documents(40, SEED + 2000)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    from seqserve.models.synthetic import TINY_OVERRIDES, tiny_bert, tiny_translator

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("checkpoints")
    steps = {"steps": TRAIN_STEPS, "validate_every": TRAIN_STEPS, "seed": SEED}
    # The Transformer needs its learning settings to translate reliably: tests check its reversals and that int8
    # keeps BLEU within a point, which a half-trained model (flat logits) does not do reliably.
    extra = {"transformer": {**TINY_OVERRIDES["transformer"], "validate_every": TINY_OVERRIDES["transformer"]["steps"]}}
    checkpoints = {
        arch: tiny_translator(root / arch, arch=arch, **{**steps, **extra.get(arch, {})}) for arch in TRANSLATOR_ARCHS
    }
    checkpoints["bert"] = tiny_bert(root / "bert", **steps)
    return checkpoints


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoints: dict[str, Path]) -> Path:
    import torch

    from seqserve.export import export_checkpoint

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("model_repository")
    for arch, name in REPOSITORY_NAMES.items():
        export_checkpoint(tiny_checkpoints[arch], root, name, version=1)
    export_checkpoint(tiny_checkpoints["lstm"], root, "tiny-lstm-int8", version=1, quantize="int8",
                      dev=tiny_dev_pairs())  # fmt: skip
    export_checkpoint(tiny_checkpoints["bert"], root, "tiny-bert-int8", version=1, quantize="int8",
                      sample_documents=tiny_documents())  # fmt: skip
    return root


@pytest.fixture
def restore_logging():
    """Commands that configure logging replace the root logger's handlers; put them back for the tests after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for a test (modules that train or compare models use it: `pytestmark`): the CI machine's
    two cores are shared by the whole suite, and one thread keeps runs bit-for-bit repeatable."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
