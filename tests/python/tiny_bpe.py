"""A tiny CLIP-style byte-level BPE (the 256 byte symbols, their `</w>` forms, and merges that
spell a few whole words), shared by the fixtures that need a CLIP tokenizer without downloading
one."""


def bytes_to_unicode():
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def bpe_vocab_merges(words):
    """(vocab, merges) whose merges build each of `words` as one token, plus CLIP's BOS/EOS."""
    chars = bytes_to_unicode()
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            pair = (cur, p)
            cur = cur + p
            if pair not in merges:
                merges.append(pair)
            if cur not in vocab:
                vocab[cur] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges
