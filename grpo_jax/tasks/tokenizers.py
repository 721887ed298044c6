"""A character-level tokenizer for the built-in synthetic tasks (no download needed)."""

from __future__ import annotations

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
# Everything the arithmetic / countdown tasks and the R1 template write, one token per character.
CHARS = ("0123456789+-*/=()., <>:?!abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n#_[]'")


R1_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def char_tokenizer(extra_chars: str = "", tags: bool = False):
    """A `transformers` fast tokenizer: ids 0-3 are <pad>, <s>, </s>, <unk>, then one id per
    character; with `tags`, the four R1 tags are single tokens too. Saved with `save_pretrained`,
    it reloads through `hf_io.load_tokenizer`."""
    import tokenizers
    import transformers

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for c in CHARS + extra_chars:
        vocab.setdefault(c, len(vocab))
    for t in R1_TAGS if tags else ():
        vocab[t] = len(vocab)
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    if tags:
        tk.add_tokens([tokenizers.AddedToken(t, normalized=False) for t in R1_TAGS])
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    tk.decoder = tokenizers.decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>",
                                                bos_token="<s>", eos_token="</s>", unk_token="<unk>")
