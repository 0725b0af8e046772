"""Admission: the one estimator of how long a request would wait, from running totals.

Every request is admitted or refused in O(1) of the queue: the totals (tokens and pairs admitted
and not yet scored, characters waiting to be tokenized, the round the model runs now) move when
work arrives, starts and ends; nothing walks the queue. A request is refused (429 with
Retry-After) when the work ahead of it plus its own could not end by its deadline at the measured
speed, or when the queue's pair cap would be passed; before the model is ready, 503.

The work ahead is *all* admitted work, though under earliest-deadline-first a later-deadline
request may be passed: an upper bound that is exact whenever deadlines arrive in order (one
server-wide default), and that never admits a request which then misses its deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import Rejected

__all__ = ["Admission", "Ticket", "ROUND_OVERHEAD_S"]

# EWMA weight of the newest measurement (tokens/s, chars/token, chars/s).
_ALPHA = 0.2
# Fixed cost of a round beyond its tokens (assembly, Python, thread hand-offs), seconds.
ROUND_OVERHEAD_S = 0.002
# Characters per token before any request has been tokenized (English WordPiece is ~4-5).
_CHARS_PER_TOKEN = 4.0
# Tokenizer speed (characters/s) before any request has been measured.
_CHARS_PER_SECOND = 2e6


@dataclass
class Ticket:
    """A request admitted before tokenization: its characters wait in the tokenizing backlog."""

    chars: int
    open: bool = True


class Admission:
    """Running totals and the estimate made from them (thread-safe; every method O(1) of the queue).

    Args:
        max_queue_pairs: Pairs admitted and not yet scored, at most (``queue_full`` beyond).
        clock: ``time.monotonic`` or a stand-in (tests).
    """

    def __init__(self, *, max_queue_pairs: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_queue_pairs = int(max_queue_pairs)
        self.clock = clock
        self._lock = threading.Lock()
        self.tokens_per_s = 0.0  # measured scoring speed (real tokens)
        self.chars_per_token = _CHARS_PER_TOKEN
        self.chars_per_s = _CHARS_PER_SECOND
        self.tokens_per_pair = 0.0  # of scored pairs (0 before any)
        self.queued_tokens = 0  # admitted, not yet scored or dropped
        self.queued_pairs = 0
        self.queued_jobs = 0
        self.tokenizing_chars = 0
        self._running: tuple[float, int] | None = None  # (start, tokens) of the round running now
        self._ready = False
        self._failure: str | None = None

    # --- readiness -------------------------------------------------------------------------

    def open(self, tokens_per_s: float) -> None:
        """The model is calibrated: admit from now on at this speed."""
        with self._lock:
            self.tokens_per_s = float(tokens_per_s)
            self._ready = True

    def fail(self, why: str) -> None:
        """The model cannot serve any more (shutdown, a dead thread): refuse everything with 503."""
        with self._lock:
            self._failure = why

    @property
    def ready(self) -> bool:
        return self._ready and self._failure is None

    # --- estimates -------------------------------------------------------------------------

    def estimate_tokens(self, query_chars: int, text_chars: list[int], max_length: int, n_special: int) -> int:
        """Tokens of a request's pairs guessed from characters, before tokenizing it."""
        if not text_chars:
            return 0
        chars = query_chars + np.asarray(text_chars, dtype=np.float64)
        est = np.minimum(chars / self.chars_per_token, max_length - n_special) + n_special
        return int(est.sum())

    def estimate_prompt_tokens(self, prompt_chars: int, text_chars: list[int], fixed_before: int, suffix: int,
                               max_length: int) -> int:
        """An LLM request's tokens guessed from characters: the prefix once (the template's own
        tokens plus the query and instruction), then each document (cut to the room left) and
        the suffix: what its rounds compute."""
        if not text_chars:
            return 0
        before = fixed_before + prompt_chars / self.chars_per_token
        room = max(0.0, max_length - before - suffix)
        docs = np.minimum(np.asarray(text_chars, dtype=np.float64) / self.chars_per_token, room) + suffix
        return int(before + docs.sum())

    def _ahead_s(self, now: float) -> float:
        """Seconds of admitted work before a new request's turn (lock held)."""
        ahead = self.queued_tokens
        if self._running is not None:
            start, tokens = self._running
            ahead -= min(tokens, int((now - start) * self.tokens_per_s))
        return max(0, ahead) / max(self.tokens_per_s, 1e-9)

    def _check(self, tokens: int, pairs: int, deadline: float, now: float, lead_s: float, busy: bool) -> None:
        if not self.ready:
            raise Rejected("not_ready", "the model is not ready; retry shortly", 1.0, status=503)
        rate = max(self.tokens_per_s, 1e-9)
        if self.queued_pairs + pairs > self.max_queue_pairs:
            excess = self.queued_pairs + pairs - self.max_queue_pairs
            per_pair = self.queued_tokens / max(1, self.queued_pairs)
            raise Rejected(
                "queue_full",
                f"the queue is full ({self.queued_pairs} pairs waiting, limit {self.max_queue_pairs}); retry later",
                excess * per_pair / rate,
            )
        # Its pairs start once both its tokenization and the work ahead are done; a request
        # with no pairs to score (all cached) waits for its tokenization only.
        wait = self._ahead_s(now) if pairs else 0.0
        start = max(lead_s, wait)
        finish = now + start + tokens / rate + ROUND_OVERHEAD_S
        # An idle server admits anything: a request too large for its deadline is then ranked in
        # part (degraded) rather than refused.
        if (busy or self.queued_tokens > 0) and finish > deadline:
            raise Rejected(
                "deadline",
                f"overloaded: about {start * 1000:.0f} ms of queued work is ahead of this request, which needs "
                f"{tokens / rate * 1000:.0f} ms more; it could not finish within its deadline "
                f"({(deadline - now) * 1000:.0f} ms left)",
                finish - deadline,
            )

    # --- the request's life ----------------------------------------------------------------

    def before_tokenizing(self, tokens: int, pairs: int, chars: int, deadline: float) -> Ticket:
        """Admits a request on its estimated tokens before it is tokenized (a refusal never
        waits behind tokenization); its characters join the tokenizing backlog."""
        with self._lock:
            lead = (self.tokenizing_chars + chars) / self.chars_per_s
            self._check(tokens, pairs, deadline, self.clock(), lead, self.tokenizing_chars > 0)
            self.tokenizing_chars += chars
        return Ticket(chars)

    def tokenized(self, ticket: Ticket, *, tokens: int, seconds: float | None) -> None:
        """Its tokenization ended (or failed: ``seconds`` None): the backlog shrinks and the
        characters-per-token and tokenizer-speed estimates learn from it."""
        with self._lock:
            if not ticket.open:
                return
            ticket.open = False
            self.tokenizing_chars -= ticket.chars
            if seconds is None or tokens <= 0:
                return
            self.chars_per_token += _ALPHA * (max(1.0, ticket.chars / tokens) - self.chars_per_token)
            if seconds > 0:
                self.chars_per_s += _ALPHA * (max(ticket.chars, 1) / seconds - self.chars_per_s)

    def enqueue(self, tokens: int, pairs: int, deadline: float) -> None:
        """Admits a tokenized job into the queue (its real tokens), or raises :class:`Rejected`."""
        with self._lock:
            self._check(tokens, pairs, deadline, self.clock(), 0.0, False)
            self.queued_tokens += tokens
            self.queued_pairs += pairs
            self.queued_jobs += 1

    def round_started(self, tokens: int) -> None:
        with self._lock:
            self._running = (self.clock(), tokens)

    def round_ended(self, *, tokens: int, pairs: int, seconds: float | None) -> None:
        """The running round ended; ``seconds`` (None when cut short or failed) updates the speed."""
        with self._lock:
            self._running = None
            if seconds is not None and seconds > 0 and tokens > 0:
                self.tokens_per_s += _ALPHA * (tokens / seconds - self.tokens_per_s)
                per_pair = tokens / max(1, pairs)
                self.tokens_per_pair = per_pair if not self.tokens_per_pair else (
                    self.tokens_per_pair + _ALPHA * (per_pair - self.tokens_per_pair))

    def settled(self, *, tokens: int, pairs: int, job_done: bool) -> None:
        """Admitted work left the queue (scored, dropped or failed)."""
        with self._lock:
            self.queued_tokens -= tokens
            self.queued_pairs -= pairs
            self.queued_jobs -= int(job_done)
