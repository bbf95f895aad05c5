"""A tiny random Llama with a locally trained BPE tokenizer and a ChatML template, for
plumbing tests that need a real engine but no real answers (built in about 20 s)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.tools.builtin_models import (
    END_OF_TEXT,
    IM_END,
    IM_START,
    Progress,
    _ensure,
    _silent,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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


def build_tiny_model(dest: Path, seed: int = 0, progress: Progress | None = None) -> Path:
    """Build (once) a tiny random Llama with a ChatML tokenizer in ``dest``; return ``dest``.

    The tokenizer is the same for every seed; the weights are a function of ``seed``.
    """
    dest = Path(dest)
    spec = {"recipe": "tiny-llama", "version": TINY_VERSION, "seed": seed}
    report = progress or _silent
    lock = dest.parent / f".{dest.name}.lock"
    return _ensure(dest, spec, lambda work: _build_tiny(work, seed, report), lock, report)


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
