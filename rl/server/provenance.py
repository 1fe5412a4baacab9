"""Sampled-sequence records, and the provenance spans of training datums resolved against them.

Every sequence the server samples gets a session-scoped id (`sequence_ids`), returned with the
asample answer. A sample made with `record_stability_info=True` also leaves a record of each
of its sequences (`SequenceRecord`) in its tenant's `SequenceStore`: what StableReinforce
needs from sampling time, kept on the server so that a training request can name it by id
instead of sending it back.

A training datum with provenance spans (`Datum.with_provenance` in the SDK) is checked against
those records before the trainer sees it (`resolve`): each span must fit its sequence, and the
datum's real tokens must be the recorded ones (model_input on prompt and sampled spans,
target_tokens on sampled spans; the target tokens of prompt spans are not checked, since
tinker-cookbook's rl_loop puts placeholder zeros there). For `stable_reinforce` every datum
needs spans, every span must name a recorded sequence of the training client's session,
advantages may be nonzero only on sampled positions, and `logprobs` on sampled positions are
the recorded sampler logprobs, whatever the client sent: recording exists so that the loss's
behaviour-policy numbers come from the server, not from the client. Other losses accept spans
(cookbook 0.6.1 attaches them to every RL datum) and check them where a record exists; a span
naming a sequence without a record (sampled with `record_stability_info=False`, the cookbook's
setting for those losses) is accepted unchecked, and their `logprobs` are the client's.
Spans never reach the trainer: `resolve` strips them.

Bounds: a record lives `ttl_s` (a day, the SDK's promise) after its last use, sampling or a
successful training request that names it (a sliding TTL); records of a session go when the
session ends (provenance is session-scoped); a tenant's records hold at most `max_bytes`, and
past it the least recently used go first. A span naming an expired or evicted sequence gets
an error that says so.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from rl.errors import InvalidRequestError
from rl.types import Datum, PromptSpan, SampledSpan, TensorData, target_length

# Losses whose sampler logprobs come from the record, so every datum must name recorded
# sequences of its session.
RECORDED_LOSSES = frozenset({"stable_reinforce"})
# Bytes a record costs beyond its arrays (the object, its id, the dict entry), roughly.
RECORD_OVERHEAD = 400
# Ids of records gone (expired, evicted, session ended) remembered per tenant, for the error.
GONE_KEPT = 65_536


def session_of(server_id: str) -> str:
    """The session a model or sampling session id belongs to (`<session>:train:<n>`,
    `<session>:sample:<n>`; a session id has no colon)."""
    return server_id.split(":", 1)[0]


def sequence_ids(sampling_session_id: str, request_id: str, num_samples: int) -> list[str]:
    """The ids of one asample request's sequences, in output order."""
    session = session_of(sampling_session_id)
    return [f"{session}:seq:{request_id}:{i}" for i in range(num_samples)]


@dataclass(frozen=True)
class SequenceRecord:
    """What sampling time leaves for training, per sampled sequence.

    `prompt`, `tokens`, `logprobs`: the request's prompt and this sequence's sampled tokens
    and their logprobs (the model's own, without temperature, as every sample returns them);
    the tokens are what spans are checked against, the logprobs are the loss's sampler numbers.
    `temperature`, `top_k`, `top_p`: the distribution actually sampled from, which differs
    from the one the logprobs describe unless they are 1, -1, 1. `sampler_id`: the sampling
    session, hence the weights that sampled (staleness: each weight sync is a new one).
    `sampled_at`: wall time, for the same.
    """

    session_id: str
    sampler_id: str
    prompt: np.ndarray  # [P] int32, shared by the sequences of one request
    tokens: np.ndarray  # [S] int32
    logprobs: np.ndarray  # [S] float32
    temperature: float
    top_k: int
    top_p: float
    sampled_at: float
    prompt_share: int = 1  # sequences sharing `prompt`: each is charged a share of it

    @property
    def nbytes(self) -> int:
        return (
            self.prompt.nbytes // self.prompt_share
            + self.tokens.nbytes
            + self.logprobs.nbytes
            + RECORD_OVERHEAD
        )


@dataclass
class _Entry:
    record: SequenceRecord
    used_at: float


@dataclass
class _Tenant:
    # Ordered by last use, oldest first: the front is the first to expire and to be evicted.
    entries: collections.OrderedDict[str, _Entry] = field(default_factory=collections.OrderedDict)
    nbytes: int = 0
    gone: collections.OrderedDict[str, str] = field(default_factory=collections.OrderedDict)


class SequenceStore:
    """The tenants' sequence records, bounded by a sliding TTL and a byte cap per tenant."""

    def __init__(
        self,
        ttl_s: float,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        gone_kept: int = GONE_KEPT,
    ):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._gone_kept = gone_kept
        self._lock = threading.Lock()
        self._tenants: dict[str, _Tenant] = collections.defaultdict(_Tenant)
        self._dropped: collections.Counter[tuple[str, str]] = collections.Counter()

    def add(self, tenant: str, records: dict[str, SequenceRecord]) -> None:
        """Records sequences; the least recently used of the tenant's go if it is over its cap
        (never those just added)."""
        now = self._clock()
        with self._lock:
            held = self._tenants[tenant]
            self._expire(tenant, held, now)
            for sequence_id, record in records.items():
                self._drop(tenant, held, sequence_id, None)
                held.entries[sequence_id] = _Entry(record, now)
                held.nbytes += record.nbytes
            while held.nbytes > self.max_bytes and len(held.entries) > len(records):
                oldest = next(iter(held.entries))
                self._drop(tenant, held, oldest, "evicted")

    def get(self, tenant: str, sequence_id: str) -> SequenceRecord | str:
        """The record, or why there is none: "unknown" (never recorded for this tenant, or
        forgotten), "expired", "evicted", "session ended"."""
        now = self._clock()
        with self._lock:
            held = self._tenants.get(tenant)
            if held is None:
                return "unknown"
            self._expire(tenant, held, now)
            entry = held.entries.get(sequence_id)
            if entry is not None:
                return entry.record
            return held.gone.get(sequence_id, "unknown")

    def touch(self, tenant: str, sequence_ids: Iterable[str]) -> None:
        """Restarts the TTL of the named records still held (a training request used them)."""
        now = self._clock()
        with self._lock:
            held = self._tenants.get(tenant)
            if held is None:
                return
            for sequence_id in sequence_ids:
                entry = held.entries.get(sequence_id)
                if entry is not None:
                    entry.used_at = now
                    held.entries.move_to_end(sequence_id)

    def end_session(self, session_id: str) -> None:
        """Forgets the records of a session that ended."""
        with self._lock:
            for tenant, held in self._tenants.items():
                ended = [s for s, e in held.entries.items() if e.record.session_id == session_id]
                for sequence_id in ended:
                    self._drop(tenant, held, sequence_id, "session ended")

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """Per tenant: (records held, their bytes), after dropping the expired ones."""
        now = self._clock()
        with self._lock:
            for tenant, held in self._tenants.items():
                self._expire(tenant, held, now)
            return {t: (len(h.entries), h.nbytes) for t, h in self._tenants.items() if h.entries}

    def dropped(self) -> dict[tuple[str, str], int]:
        """Records dropped so far, per (tenant, why): "expired", "evicted", "session ended"."""
        with self._lock:
            return dict(self._dropped)

    def _expire(self, tenant: str, held: _Tenant, now: float) -> None:
        while held.entries:
            sequence_id, entry = next(iter(held.entries.items()))
            if now - entry.used_at <= self.ttl_s:
                return
            self._drop(tenant, held, sequence_id, "expired")

    def _drop(self, tenant: str, held: _Tenant, sequence_id: str, why: str | None) -> None:
        entry = held.entries.pop(sequence_id, None)
        if entry is None:
            return
        held.nbytes -= entry.record.nbytes
        if why is None:
            return
        self._dropped[tenant, why] += 1
        held.gone[sequence_id] = why
        while len(held.gone) > self._gone_kept:
            held.gone.popitem(last=False)


def record_sample(
    session_id: str,
    sampler_id: str,
    prompt: Sequence[int],
    sequences: Sequence[tuple[Sequence[int], Sequence[float] | None]],
    temperature: float,
    top_k: int,
    top_p: float,
) -> list[SequenceRecord]:
    """The records of one sample's sequences ((tokens, logprobs) each), sharing its prompt."""
    shared = np.asarray(prompt, dtype=np.int32)
    records = []
    for tokens, logprobs in sequences:
        if logprobs is None or len(logprobs) != len(tokens):
            raise RuntimeError("the sampler returned no logprob per sampled token to record")
        records.append(
            SequenceRecord(
                session_id=session_id,
                sampler_id=sampler_id,
                prompt=shared,
                tokens=np.asarray(tokens, dtype=np.int32),
                logprobs=np.asarray(logprobs, dtype=np.float32),
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                sampled_at=time.time(),
                prompt_share=max(1, len(sequences)),
            )
        )
    return records


# -- resolution ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolution:
    """The datums as the trainer gets them (spans stripped; for a recorded loss, `logprobs`
    from the records) and the sequences they used (their TTL restarts when training does)."""

    data: list[Datum]
    used: frozenset[str]


def resolve(
    store: SequenceStore, tenant: str, session_id: str, loss_fn: str, data: Sequence[Datum]
) -> Resolution:
    """Checks every datum's spans against the tenant's records (see the module docstring);
    raises InvalidRequestError naming the datum, span and sequence, and changes nothing."""
    strict = loss_fn in RECORDED_LOSSES
    out: list[Datum] = []
    used: set[str] = set()
    for index, datum in enumerate(data):
        if datum.model_input_spans is None or datum.loss_fn_input_spans is None:
            if strict:
                raise InvalidRequestError(
                    f"datum {index}: loss_fn={loss_fn!r} needs provenance on every datum "
                    "(Datum.with_provenance, naming the sequence_id of each sampled sequence, "
                    "sampled with record_stability_info=True); this datum has none"
                )
            out.append(datum)
            continue
        resolved, names = _resolve_datum(index, datum, store, tenant, session_id, strict)
        out.append(resolved)
        used |= names
    return Resolution(out, frozenset(used))


@dataclass(frozen=True)
class _Where:
    """A span and the datum positions it covers, for lookups and error messages."""

    index: int
    field: str
    j: int
    span: PromptSpan | SampledSpan
    start: int  # first datum position

    def __str__(self) -> str:
        s = self.span
        return (
            f"datum {self.index}: {self.field}[{self.j}] ({s.kind} span, offset {s.offset}, "
            f"length {s.length}, at positions {self.start}..{self.start + s.length - 1})"
        )


def _walk(index: int, field: str, spans: Sequence[PromptSpan | SampledSpan]) -> list[_Where]:
    out, start = [], 0
    for j, span in enumerate(spans):
        out.append(_Where(index, field, j, span, start))
        start += span.length
    return out


def _resolve_datum(
    index: int, datum: Datum, store: SequenceStore, tenant: str, session_id: str, strict: bool
) -> tuple[Datum, set[str]]:
    assert datum.model_input_spans is not None and datum.loss_fn_input_spans is not None
    used: set[str] = set()
    tokens = np.asarray(datum.model_input.to_ints(), dtype=np.int64)
    for where in _walk(index, "model_input_spans", datum.model_input_spans):
        record = _record(where, store, tenant, session_id, strict)
        if record is not None:
            _check_tokens(where, "model_input", tokens, record)
            used.add(where.span.sequence_id)
    update: dict[str, object] = {"model_input_spans": None, "loss_fn_input_spans": None}
    n_targets = target_length(datum)
    if n_targets is None:  # [N, K] targets: the spans tile nothing the record can check
        return datum.model_copy(update=update), used
    targets = datum.loss_fn_inputs["target_tokens"].to_numpy().astype(np.int64)
    sampled = np.zeros(n_targets, dtype=bool)
    recorded = np.zeros(n_targets, dtype=np.float32)
    for where in _walk(index, "loss_fn_input_spans", datum.loss_fn_input_spans):
        record = _record(where, store, tenant, session_id, strict)
        if record is None:
            continue
        used.add(where.span.sequence_id)
        if where.span.kind == "prompt":  # placeholder targets are allowed: range only
            _check_range(where, record)
            continue
        _check_tokens(where, "target_tokens", targets, record)
        s = where.span
        sampled[where.start : where.start + s.length] = True
        recorded[where.start : where.start + s.length] = record.logprobs[
            s.offset : s.offset + s.length
        ]
    if strict:
        _check_advantages(index, datum, sampled)
        logprobs = _with_recorded(datum, sampled, recorded)
        if logprobs is not None:
            update["loss_fn_inputs"] = {**datum.loss_fn_inputs, "logprobs": logprobs}
    return datum.model_copy(update=update), used


def _with_recorded(datum: Datum, sampled: np.ndarray, recorded: np.ndarray) -> TensorData | None:
    """The datum's `logprobs` with the recorded values on sampled positions (zeros elsewhere
    when the client sent none); None when the client's have another shape, which the trainer
    then reports."""
    client = datum.loss_fn_inputs.get("logprobs")
    if client is None:
        logprobs = np.zeros(sampled.shape, dtype=np.float32)
    else:
        logprobs = client.to_numpy().astype(np.float32)
        if logprobs.shape != sampled.shape:
            return None
    logprobs = np.where(sampled, recorded, logprobs).astype(np.float32)
    return TensorData.from_numpy(logprobs)


def _record(
    where: _Where, store: SequenceStore, tenant: str, session_id: str, strict: bool
) -> SequenceRecord | None:
    """The span's record; None where a lenient loss may go without one."""
    sequence_id = where.span.sequence_id
    found = store.get(tenant, sequence_id)
    if isinstance(found, SequenceRecord):
        if found.session_id != session_id:
            raise InvalidRequestError(
                f"{where} names sequence {sequence_id!r}, sampled in another session "
                f"({found.session_id!r}); provenance works only within one session, and this "
                f"training client belongs to {session_id!r}"
            )
        return found
    if not strict:
        return None
    why = {
        "expired": (
            "whose record expired: it was last sampled or trained on more than "
            f"{store.ttl_s:g} s ago"
        ),
        "evicted": (
            "whose record was evicted: this tenant's records reached the server's cap "
            f"({store.max_bytes / 2**20:g} MiB, --max_sequence_record_mib_per_tenant); the "
            "least recently used go first"
        ),
        "session ended": "whose record is gone: the session that sampled it ended",
    }.get(
        found,
        "which this session has no record of: it is not a sequence this tenant sampled, or it "
        "was sampled without record_stability_info=True",
    )
    raise InvalidRequestError(f"{where} names sequence {sequence_id!r}, {why}")


def _source(span: PromptSpan | SampledSpan, record: SequenceRecord) -> tuple[np.ndarray, str]:
    if span.kind == "prompt":
        return record.prompt, "prompt"
    return record.tokens, "sampled tokens"


def _check_range(where: _Where, record: SequenceRecord) -> None:
    source, what = _source(where.span, record)
    end = where.span.offset + where.span.length
    if end > len(source):
        raise InvalidRequestError(
            f"{where} reaches position {end} of sequence {where.span.sequence_id!r}'s {what}, "
            f"which has {len(source)} tokens"
        )


def _check_tokens(where: _Where, field: str, tokens: np.ndarray, record: SequenceRecord) -> None:
    _check_range(where, record)
    source, what = _source(where.span, record)
    s = where.span
    mine = tokens[where.start : where.start + s.length]
    theirs = source[s.offset : s.offset + s.length].astype(np.int64)
    differ = np.flatnonzero(mine != theirs)
    if differ.size:
        k = int(differ[0])
        raise InvalidRequestError(
            f"{where}: {field} does not match sequence {s.sequence_id!r}'s {what}: at position "
            f"{where.start + k} the datum has token {int(mine[k])}, the sequence has "
            f"{int(theirs[k])} (its {what} position {s.offset + k})"
        )


def _check_advantages(index: int, datum: Datum, sampled: np.ndarray) -> None:
    advantages = datum.loss_fn_inputs.get("advantages")
    if advantages is None:
        return  # the trainer reports the missing input
    values = advantages.to_numpy().reshape(-1)
    if values.shape != sampled.shape:
        return  # the trainer reports the length mismatch
    bad = np.flatnonzero((values != 0) & ~sampled)
    if bad.size:
        p = int(bad[0])
        raise InvalidRequestError(
            f"datum {index}: advantages[{p}] = {float(values[p]):g} is nonzero on a position "
            "that loss_fn_input_spans do not attribute to a sampled token; stable_reinforce "
            "trains sampled tokens only (put 0 on prompt positions)"
        )


__all__ = [
    "RECORDED_LOSSES",
    "Resolution",
    "SequenceRecord",
    "SequenceStore",
    "record_sample",
    "resolve",
    "sequence_ids",
    "session_of",
]
