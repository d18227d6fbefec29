"""Nothing distil loads can run code, and no secret reaches a file.

- The source never unpickles: no ``torch.load`` without ``weights_only=True``, no pickle
  modules, no ``trust_remote_code`` other than ``False``, and every model ``from_pretrained``
  of distil's own code asks for ``use_safetensors=True`` (GGUF files excepted: tensors, no
  pickle). The checker is an AST walk, tested on a snippet that breaks each rule.
- Model folders holding only ``*.bin`` (torch pickles) are refused in one line, LM and
  generator alike, without opening the file.
- With ``OPENAI_API_KEY`` set, the classifier and LM chains of ``test_determinism`` write no
  file (tables decoded, since their pages are compressed) and print no line holding it.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import Cli, write_params
from test_determinism import CHAINS

from stages.artifacts import MANIFEST
from stages.errors import DistilError

ROOT = Path(__file__).resolve().parents[2]
PICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
NOT_WEIGHTS = ("tokenizer", "scheduler", "config", "processor")  # from_pretrained of these reads JSON / text


def _is(node: ast.expr | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loading(source: str, where: str, *, own_code: bool = True) -> list[str]:
    """Each place in ``source`` that could unpickle or run a model's code, as ``where:line: why``.
    ``own_code``: also require ``use_safetensors=True`` of model ``from_pretrained`` calls
    (tests call plain transformers on purpose, to show a folder loads without distil)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] in PICKLERS for n in names):
                found.append(f"{where}:{node.lineno}: imports a pickle module")
        if not isinstance(node, ast.Call):
            continue
        func, kw = ast.unparse(node.func), {k.arg: k.value for k in node.keywords if k.arg}
        if func in ("torch.load", "torch.serialization.load") and not _is(kw.get("weights_only"), True):
            found.append(f"{where}:{node.lineno}: {func} without weights_only=True")
        if "trust_remote_code" in kw and not _is(kw["trust_remote_code"], False):
            found.append(f"{where}:{node.lineno}: trust_remote_code is not False")
        if func.split(".")[-1] in ("load", "loads") and func.split(".")[0] in PICKLERS:
            found.append(f"{where}:{node.lineno}: {func} unpickles")
        if func in ("np.load", "numpy.load") and "allow_pickle" in kw and not _is(kw["allow_pickle"], False):
            found.append(f"{where}:{node.lineno}: {func} with allow_pickle")
        receiver = func.rsplit(".", 1)[0].lower()
        if (own_code and func.endswith(".from_pretrained") and not any(w in receiver for w in NOT_WEIGHTS)
                and "gguf_file" not in kw and not _is(kw.get("use_safetensors"), True)):  # fmt: skip
            found.append(f"{where}:{node.lineno}: {func} without use_safetensors=True")
    return found


BAD = """
import pickle
import torch
from transformers import AutoModel, AutoTokenizer
state = torch.load("m.pt")
ok = torch.load("m.pt", weights_only=True)
model = AutoModel.from_pretrained("x", trust_remote_code=True)
tok = AutoTokenizer.from_pretrained("x", trust_remote_code=False)
rows = pickle.loads(b"")
"""


def test_the_checker_flags_each_unsafe_load():
    found = unsafe_loading(BAD, "bad.py")
    assert found == [
        "bad.py:2: imports a pickle module",
        "bad.py:5: torch.load without weights_only=True",
        "bad.py:7: trust_remote_code is not False",
        "bad.py:7: AutoModel.from_pretrained without use_safetensors=True",
        "bad.py:9: pickle.loads unpickles",
    ]


def test_the_source_never_unpickles_nor_trusts_remote_code():
    own = [p for d in ("stages", "distilcli", "bench") for p in sorted((ROOT / d).rglob("*.py"))]
    tests = sorted((ROOT / "tests").rglob("*.py"))
    assert len(own) > 50 and len(tests) > 20
    found = [f for p in own for f in unsafe_loading(p.read_text(), str(p.relative_to(ROOT)))]
    found += [f for p in tests for f in unsafe_loading(p.read_text(), str(p.relative_to(ROOT)), own_code=False)]
    assert not found, "\n".join(found)


# ---- pickled weights are refused ---------------------------------------------------------


def _pickles_only(model: Path, out: Path, weights: str, pickled: str) -> Path:
    """A copy of ``model`` with its ``weights`` safetensors file replaced by the ``pickled``
    file a torch checkpoint would be (junk bytes: it must be refused unread)."""
    shutil.copytree(model, out, ignore=shutil.ignore_patterns(MANIFEST, "dvclive"))
    (out / weights).unlink()
    (out / pickled).write_bytes(b"not a pickle: refused unread")
    return out


def test_an_lm_folder_of_pickled_weights_is_refused(chains, tmp_path):
    cli = Cli(write_params(tmp_path))
    lm = _pickles_only(chains["lm"] / "teacher", tmp_path / "bin", "model.safetensors", "pytorch_model.bin")
    out = tmp_path / "ev"
    cli.fails("evaluate", "--model", lm, "--data", "basic_arithmetic", "--out", out, "--set", "data.sizes=[60,10,10]",
              match="safetensors only")  # fmt: skip
    assert not out.exists() and not out.with_name("ev.partial").exists()


def test_a_generator_of_pickled_weights_is_refused(tmp_path):
    from diffusers import DDPMScheduler

    from stages.config import DiffusionConfig
    from stages.diffusion.generator import load_generator, save_generator
    from stages.diffusion.models import build_denoiser

    save_generator(tmp_path / "g", build_denoiser(DiffusionConfig(width=8, depth=1), [2], 0), DDPMScheduler())
    assert load_generator(tmp_path / "g").kind == "diffusion"  # the intact folder loads
    weights = "denoiser/diffusion_pytorch_model"
    pickled = _pickles_only(tmp_path / "g", tmp_path / "bin", f"{weights}.safetensors", f"{weights}.bin")
    with pytest.raises(DistilError, match=r"cannot load generator .*no file named diffusion_pytorch_model\.safetensors"):
        load_generator(pickled)


# ---- no secret in any file -----------------------------------------------------------------

KEY = "sk-distil-test-DUMMY-0123456789"


@pytest.fixture(scope="module")
def chains(tmp_path_factory) -> dict[str, Path]:
    """The classifier and LM chains, run with a dummy OpenAI key in the environment; the
    key is also checked in what each command printed."""
    printed: list[str] = []
    real = Cli.ok

    def ok(self: Cli, *args):
        result = real(self, *args)
        printed.append(result.output)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", KEY)
        mp.setattr(Cli, "ok", ok)
        runs = {m: CHAINS[m](tmp_path_factory.mktemp(f"secret_{m}")) for m in ("classifier", "lm")}
    assert len(printed) == 12 and not any(KEY in out for out in printed)
    return runs


def files_holding(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` whose bytes, or for Parquet whose decoded values, hold ``secret``."""
    hits = []
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        text = repr(pq.read_table(p).to_pylist()) if p.suffix == ".parquet" else ""
        if secret.encode() in p.read_bytes() or secret in text:
            hits.append(str(p.relative_to(root)))
    return hits


def test_the_scan_finds_a_secret_in_a_compressed_table(tmp_path):
    pq.write_table(pa.table({"prompt": [f"key {KEY}"] * 50}), tmp_path / "part-00000.parquet", compression="zstd")
    (tmp_path / "notes.txt").write_text("nothing here")
    assert files_holding(tmp_path, KEY) == ["part-00000.parquet"]


@pytest.mark.parametrize("modality", ["classifier", "lm"])
def test_no_file_a_chain_writes_holds_the_api_key(chains, modality):
    run = chains[modality]
    written = [p for p in run.rglob("*") if p.is_file()]
    kinds = {p.name for p in written} | {p.suffix for p in written} | {"dvclive" for p in written if "dvclive" in p.parts}
    assert {MANIFEST, "metrics.json", "training.json", ".parquet", ".safetensors", "dvclive"} <= kinds
    assert files_holding(run, KEY) == []
