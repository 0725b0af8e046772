"""Chunking: a text's spans of ``chunk_tokens`` embedder tokens with overlap, by character offsets."""

from __future__ import annotations

from pathlib import Path

from ..embedder import Embedder


class Chunker:
    """Splits texts into spans of ``size`` embedder tokens, consecutive spans sharing ``overlap``."""

    def __init__(self, emb: Embedder, size: int, overlap: int) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(Path(emb.model_dir) / "tokenizer.json"))
        self._tok.no_truncation()
        self._tok.no_padding()
        self.size, self.overlap = size, overlap

    def spans(self, texts: list[str]) -> list[list[tuple[int, int]]]:
        out = []
        for enc, text in zip(self._tok.encode_batch(texts, add_special_tokens=False), texts):
            offs = enc.offsets
            if len(offs) <= self.size:
                out.append([(0, len(text))])
                continue
            spans = []
            step = self.size - self.overlap
            for s in range(0, len(offs), step):
                e = min(s + self.size, len(offs))
                a = 0 if s == 0 else offs[s][0]
                b = len(text) if e == len(offs) else offs[e - 1][1]
                spans.append((a, b))
                if e == len(offs):
                    break
            out.append(spans)
        return out
