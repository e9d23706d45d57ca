"""MetaSchedule's JSON tuning database, read on demand.

Why: TVM's JSONDatabase parses both files whole when it is opened and replays every record's trace on its workload
to rebuild the schedule (a Winograd conv record: 38 ms, most of it the pad's compute_inline). A resnet18 latency
table's database (2,099 records) took 43 s to open, a tuned resnet18 build's (566) 11 s, and the default database is
shared by every model built for a target: each run paid for everything ever tuned there. `LazyJSONDatabase` reads
the same two files and appends to them byte for byte as JSONDatabase does (either opens what the other wrote), but
opening only notes where each line is: a workload is parsed when a task asks for it, and a record's trace is
replayed only when the record is among the top k asked for.

Kept from JSONDatabase (json_database.cc, database.cc; TVM 0.27): workloads match by structural hash, then
structural equality; records rank by mean run time, ties in commit order; a record is valid when one of its run
times is not the failure stub and its trace has an instruction before post-processing. JSONDatabase rehashes every
workload when it opens, because a stored hash might come from another environment. This one looks a module up by
the stored hashes, checks the hash of every workload it parses, and parses them all before it answers that a module
is not there (a new workload: once per opened database); at the first stored hash that differs it rehashes them all.
Not kept: a corrupt record line is reported (file and line) when its workload is first asked for, not on opening.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule import _ffi_api
from tvm.s_tir.meta_schedule.database import PyDatabase, TuningRecord, Workload
from tvm.tirx import FloatImm, IndexMap, IntImm

from ...errors import BackendError

FAILED_RUN_SECS = 1e10  # MetaSchedule's run time of a candidate that failed to build or run
_RECORD_PREFIX = re.compile(rb"\[(\d+),")
_WORKLOAD_PREFIX = re.compile(rb'\["(\d+)",')
_HASH_MASK = (1 << 64) - 1


def open_database(path_workload: str, path_tuning_record: str) -> LazyJSONDatabase:
    """The database over these two files, created when missing (as JSONDatabase(allow_missing=True) does)."""
    for path in (path_workload, path_tuning_record):
        if not os.path.exists(path):
            open(path, "ab").close()
    return LazyJSONDatabase(path_workload, path_tuning_record)


def dumps(obj) -> str:
    """`obj` (a TVM JSON object: as_json's output before Python conversion) as MetaSchedule's JSONDumps writes
    it: no spaces, map keys sorted, floats to 20 significant digits, true and false only for bool IntImms, strings
    escaped by TVM's StrEscape (whose \\xNN for a byte outside printable ASCII neither TVM's reader nor ours
    reads back), an IndexMap as its indented JSON graph."""
    parts: list[str] = []
    _dump(obj, parts)
    return "".join(parts)


def _dump(obj, out: list[str]) -> None:
    if obj is None:
        out.append("null")
    elif isinstance(obj, bool):  # a bool held by value reaches JSONDumps as an integer IntImm
        out.append("1" if obj else "0")
    elif isinstance(obj, IntImm):
        out.append(("true" if obj.value else "false") if str(obj.ty) == "bool" else str(int(obj.value)))
    elif isinstance(obj, int):
        out.append(str(obj))
    elif isinstance(obj, FloatImm):
        out.append(f"{obj.value:.20g}")
    elif isinstance(obj, float):
        out.append(f"{obj:.20g}")
    elif isinstance(obj, str):
        out.append(_escaped(obj))
    elif isinstance(obj, tvm_ffi.Array | list):
        out.append("[")
        for i, item in enumerate(obj):
            if i:
                out.append(",")
            _dump(item, out)
        out.append("]")
    elif isinstance(obj, tvm_ffi.Map | dict):
        out.append("{")
        for i, key in enumerate(sorted(obj.keys(), key=lambda k: str(k).encode())):
            if i:
                out.append(",")
            out.append(_escaped(str(key)))
            out.append(":")
            _dump(obj[key], out)
        out.append("}")
    elif isinstance(obj, IndexMap):
        graph = tvm_ffi.get_global_func("ffi.ToJSONGraph")(obj, {"tvm_version": tvm.__version__})
        out.append(_escaped(tvm_ffi.get_global_func("ffi.json.Stringify")(graph, 2)))
    else:
        raise TypeError(f"cannot write a {type(obj).__name__} into a tuning record")


_ESCAPES = {ord('"'): '\\"', ord("\\"): "\\\\", ord("\t"): "\\t", ord("\r"): "\\r", ord("\n"): "\\n"}


def _escaped(text: str) -> str:
    """TVM's StrEscape, quoted: printable ASCII as is, a few C escapes, every other byte of the UTF-8 as \\xNN."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    chars = []
    for byte in text.encode():
        if byte in _ESCAPES:
            chars.append(_ESCAPES[byte])
        elif 32 <= byte <= 126:
            chars.append(chr(byte))
        else:
            chars.append(f"\\x{byte:02X}")
    return '"' + "".join(chars) + '"'


def _structural_hash(mod) -> int:
    """The hash JSONDatabase stores: ffi::StructuralHash, unsigned."""
    return tvm_ffi.structural_hash(mod) & _HASH_MASK


def _mean(run_secs) -> float:
    """SortTuningRecordByMeanRunSecs::Mean: no run times rank as the failure stub."""
    values = [_seconds(s) for s in run_secs or []]
    return sum(values) / len(values) if values else FAILED_RUN_SECS


def _seconds(value) -> float:
    """A run time as JSON reads it (a number) or as a record holds it (a FloatImm)."""
    return float(value.value if isinstance(value, FloatImm) else value)


def _valid(run_secs, kinds: Iterator[str]) -> bool:
    """TuningRecordNode::IsValid: some run time that is not the failure stub, and at least one trace instruction
    (`kinds`: their names in order) before post-processing."""
    if not any(_seconds(s) != FAILED_RUN_SECS for s in run_secs or []):
        return False
    return next(kinds, "EnterPostproc") != "EnterPostproc"


@dataclass
class _Entry:
    """One record of a workload: where it ranks, and the record once its trace has been replayed."""

    mean: float
    seq: int  # commit order, the file's line - 1: ties in mean run time rank by it, as in JSONDatabase
    valid: bool
    record_json: list | None  # until the record is built
    record: TuningRecord | None = None

    def key(self) -> tuple[float, int]:
        return self.mean, self.seq


@derived_object
class LazyJSONDatabase(PyDatabase):
    """JSONDatabase's two files, parsed a workload at a time (see the module docstring)."""

    def __init__(self, path_workload: str, path_tuning_record: str) -> None:
        super().__init__()
        self.path_workload, self.path_tuning_record = path_workload, path_tuning_record
        self._workload_at: list[int] = []  # workload line -> its byte offset
        self._workloads: dict[int, Workload] = {}  # the workload lines parsed so far
        self._by_hash: dict[int, list[int]] = {}  # structural hash -> workload lines, in file order
        # A file may hold a module on two lines (JSONDatabase keeps the first and reads the records of both):
        # each line's first line holding the same module, and each first line's lines.
        self._first_of: dict[int, int] = {}
        self._lines_of: dict[int, list[int]] = {}
        self._unread: dict[int, list[tuple[int, int]]] = {}  # workload line -> its records' (seq, byte offset)
        self._ranked_of: dict[int, list[_Entry]] = {}  # first line -> the workload's records read so far, ranked
        self._size = 0
        self._rehashed = False
        self._index_workloads()
        self._index_records()

    # -- MetaSchedule's Database interface

    def has_workload(self, mod) -> bool:
        return self._find(mod) is not None

    def commit_workload(self, mod) -> Workload:
        first = self._find(mod)
        if first is not None:
            return self._workloads[first]
        workload = Workload(mod)
        line = len(self._workload_at)
        self._workload_at.append(self._append(self.path_workload, dumps(_ffi_api.WorkloadAsJSON(workload))))
        self._workloads[line] = workload
        self._by_hash.setdefault(_structural_hash(mod), []).append(line)
        self._first_of[line], self._lines_of[line], self._ranked_of[line] = line, [line], []
        return workload

    def commit_tuning_record(self, record: TuningRecord) -> None:
        first = self._find(record.workload.mod)
        if first is None:
            raise BackendError(f"tuning database {self.path_workload}: a record for a workload never committed")
        self._append(self.path_tuning_record, dumps([IntImm("int32", first), _ffi_api.TuningRecordAsJSON(record)]))
        kinds = (inst.kind.name for inst in record.trace.insts)
        entry = _Entry(_mean(record.run_secs), self._size, _valid(record.run_secs, kinds), None, record)
        ranked = self._ranked(first)
        ranked.insert(bisect.bisect_right([e.key() for e in ranked], entry.key()), entry)
        self._size += 1

    def get_top_k(self, workload: Workload, top_k: int) -> list[TuningRecord]:
        if top_k < 0:
            raise ValueError("top_k must be non-negative")
        first = self._find(workload.mod)
        if first is None or top_k == 0:
            return []
        records = []
        for entry in self._ranked(first):
            if entry.valid:
                records.append(self._built(first, entry))
                if len(records) == top_k:
                    break
        return records

    def get_all_tuning_records(self) -> list[TuningRecord]:
        firsts = sorted({self._first(line) for line in range(len(self._workload_at))})
        everything = sorted(((entry, first) for first in firsts for entry in self._ranked(first)),
                            key=lambda pair: pair[0].key())
        return [self._built(first, entry) for entry, first in everything]

    def __len__(self) -> int:
        return self._size

    # -- ours

    def valid_means(self, mod) -> list[float]:
        """Mean run times of the workload's valid records, fastest first (no trace replayed)."""
        first = self._find(mod)
        return [] if first is None else [e.mean for e in self._ranked(first) if e.valid]

    # -- reading the files

    def _index_workloads(self) -> None:
        for number, offset, line in _lines(self.path_workload):
            match = _WORKLOAD_PREFIX.match(line)
            if match is None:
                raise _corrupt(self.path_workload, number, "not a workload")
            self._by_hash.setdefault(int(match.group(1)), []).append(len(self._workload_at))
            self._workload_at.append(offset)

    def _index_records(self) -> None:
        for number, offset, line in _lines(self.path_tuning_record):
            match = _RECORD_PREFIX.match(line)
            if match is None:
                raise _corrupt(self.path_tuning_record, number, "not a tuning record")
            if int(match.group(1)) >= len(self._workload_at):
                raise _corrupt(self.path_tuning_record, number, "its workload index is out of range")
            self._unread.setdefault(int(match.group(1)), []).append((self._size, offset))
            self._size += 1

    def _workload(self, line: int) -> Workload:
        """The workload on `line`, parsed once; its stored hash checked (see the module docstring)."""
        workload = self._workloads.get(line)
        if workload is None:
            try:
                stored, b64 = json.loads(_read_lines(self.path_workload, [self._workload_at[line]])[0])
                workload = Workload.from_json([stored, b64])
            except Exception as e:
                raise _corrupt(self.path_workload, line + 1, _last_line(e)) from e
            self._workloads[line] = workload
            if not self._rehashed and _structural_hash(workload.mod) != int(stored):
                self._rehash_all()
        return self._workloads[line]

    def _rehash_all(self) -> None:
        """What JSONDatabase does on opening: every workload parsed and indexed by the hash computed here."""
        self._rehashed = True
        self._parse_all()
        self._by_hash = {}
        for line in range(len(self._workload_at)):
            self._workloads[line] = Workload(self._workloads[line].mod)  # recomputes its hash
            self._by_hash.setdefault(_structural_hash(self._workloads[line].mod), []).append(line)
        ranked_before, self._first_of, self._lines_of, self._ranked_of = self._ranked_of, {}, {}, {}
        for first, entries in ranked_before.items():  # records read before: under their module's first line
            self._ranked_of.setdefault(self._first(first), []).extend(entries)
        for entries in self._ranked_of.values():
            entries.sort(key=_Entry.key)

    def _find(self, mod) -> int | None:
        """The first workload line holding `mod`, None when there is none. A module not found under its hash is
        looked for again once every workload has been parsed and its stored hash checked."""
        rehashed = self._rehashed
        for line in list(self._by_hash.get(_structural_hash(mod), ())):
            workload = self._workload(line)
            if self._rehashed != rehashed:  # parsing it rehashed every workload: look again
                return self._find(mod)
            if tvm_ffi.structural_equal(workload.mod, mod):
                return self._first(line)
        if len(self._workloads) < len(self._workload_at):
            self._parse_all()
            return self._find(mod)
        return None

    def _parse_all(self) -> None:
        for line in range(len(self._workload_at)):
            self._workload(line)

    def _first(self, line: int) -> int:
        """The first workload line holding the module on `line`."""
        if line not in self._first_of:
            mod = self._workload(line).mod
            same = [other for other in self._by_hash.get(_structural_hash(mod), ())
                    if other == line or tvm_ffi.structural_equal(self._workload(other).mod, mod)]
            for other in same:
                self._first_of[other] = same[0]
            self._lines_of[same[0]] = same
        return self._first_of[line]

    def _ranked(self, first: int) -> list[_Entry]:
        """The records of the workload whose first line is `first`, ranked; read from the file the first time."""
        ranked = self._ranked_of.setdefault(first, [])
        unread = [pair for line in self._lines_of.get(first, [first]) for pair in self._unread.pop(line, [])]
        lines = _read_lines(self.path_tuning_record, [offset for _, offset in unread])
        for (seq, _), text in zip(unread, lines, strict=True):
            try:
                record_json = json.loads(text)[1]
                kinds = (inst[0] for inst in record_json[0][0])
                ranked.append(_Entry(_mean(record_json[1]), seq, _valid(record_json[1], kinds), record_json))
            except (ValueError, TypeError, IndexError) as e:
                raise _corrupt(self.path_tuning_record, seq + 1, f"not a tuning record ({e})") from e
        if unread:
            ranked.sort(key=_Entry.key)
        return ranked

    def _built(self, first: int, entry: _Entry) -> TuningRecord:
        """The entry's record, its trace replayed on the workload the first time it is asked for."""
        if entry.record is None:
            try:
                entry.record = TuningRecord.from_json(entry.record_json, self._workloads[first])
            except Exception as e:
                raise _corrupt(self.path_tuning_record, entry.seq + 1,
                               f"the record does not replay on its workload: {_last_line(e)}") from e
            entry.record_json = None
        return entry.record

    @staticmethod
    def _append(path: str, text: str) -> int:
        """Append one line as JSONDatabase does (each commit reaches the file at once); returns its offset."""
        with open(path, "ab") as f:
            offset = f.tell()
            f.write(text.encode() + b"\n")
        return offset


def _lines(path: str) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, line) for each line of `path`."""
    with open(path, "rb") as f:
        offset = 0
        for number, line in enumerate(f, 1):
            yield number, offset, line
            offset += len(line)


def _read_lines(path: str, offsets: list[int]) -> list[bytes]:
    """The lines of `path` that start at `offsets`."""
    with open(path, "rb") as f:
        lines = []
        for offset in offsets:
            f.seek(offset)
            lines.append(f.readline())
        return lines


def _corrupt(path: str, number: int, why: str) -> BackendError:
    return BackendError(f"tuning database {path}, line {number}: {why}")


def _last_line(e: Exception) -> str:
    return str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
