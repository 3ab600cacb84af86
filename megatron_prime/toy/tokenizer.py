"""The toy task's tokenizer: bytes, three special tokens, and one token per fixed phrase.

Built with the ``tokenizers`` library from a hand-written vocabulary, no training:
- ids 0-255 are the 256 bytes (byte-level, GPT-2's byte-to-character table), so every text
  encodes, and decodes back to exactly itself: vLLM's detokenised text is what the math
  verifier reads, so a lossy round trip would change rewards;
- ``<|bos|>`` (put in front of every encoded text by the post-processor), ``<|endoftext|>``
  (the EOS: what the model emits to stop; vLLM and ``generate`` stop on it) and ``<|pad|>``;
- the fixed phrases of the toy task (the seven "[ACTION]" headers, "Next action: ",
  "\\boxed{", the blank line, the question and solution words, and Eurus-2's whole math
  suffix) as added tokens, matched before the byte-level model sees the text, longest first.
Digits stay single byte tokens, so the model sees numbers digit by digit.

Loading: transformers 5 loads the tokenizer of a folder whose config.json says qwen2 with its
own ``Qwen2Tokenizer`` class, whatever tokenizer_config.json names: that class re-creates
the normaliser (NFC) and the pre-tokeniser (a regex split before the byte mapping) and adds
``<|endoftext|>`` if it is missing. The toy tokenizer is built so that this changes nothing:
it has the NFC normaliser itself, a split changes no ids when there are no merges, and its
EOS already is ``<|endoftext|>`` (Qwen's name), so the loaded vocabulary stays the model's.

There is no chat template: ``render_prompt`` then joins the messages with a blank line and
encodes them with the ``<|bos|>``, and SFT trains on that same layout.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_prime.data.templates import ACTIONS, MATH_SUFFIX
from megatron_prime.toy import arithmetic

BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD)
PHRASE_TOKENS: tuple[str, ...] = (
    MATH_SUFFIX,
    *(f"[{action}]" for action in ACTIONS),
    arithmetic.NEXT_ACTION,
    arithmetic.STEP_SEPARATOR,
    arithmetic.BOXED_OPEN,
    arithmetic.QUESTION_PREFIX,
    arithmetic.EQUALS,
    *arithmetic.OPERATOR_PHRASES.values(),
    *(phrase for pair in arithmetic.ASSESS_PHRASES.values() for phrase in pair),
)


def byte_characters() -> list[str]:
    """The printable character standing for each byte value 0..255 (byte-level BPE's table).

    Bytes that are visible, non-space characters in Latin-1 stand for themselves; the others
    (control characters, space, ...) get characters from U+0100 on, in byte order.
    """
    visible = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) \
        | set(range(0xAE, 0xFF + 1))
    characters, next_free = [], 0x100
    for byte in range(256):
        if byte in visible:
            characters.append(chr(byte))
        else:
            characters.append(chr(next_free))
            next_free += 1
    return characters


def build_toy_tokenizer(folder: str | Path | None = None):
    """The toy tokenizer as a ``transformers`` fast tokenizer, saved to ``folder`` if given.

    The saved folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json) loads
    with ``AutoTokenizer.from_pretrained`` and in vLLM.
    """
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    vocab = {character: byte for byte, character in enumerate(byte_characters())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.normalizer = normalizers.NFC()
    # No regex split and no merges: the model maps each byte to its own token.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in PHRASE_TOKENS])
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, clean_up_tokenization_spaces=False)
    if folder is not None:
        save_toy_tokenizer(fast, folder)
    return fast


def save_toy_tokenizer(tokenizer, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # transformers 5 records its own backend class name, which transformers 4 (and vLLM
    # builds pinned to it) cannot resolve; the generic fast class loads in both.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n")
    return folder
