"""The tuning database read on demand (backends/tvm/tuning_database.py) against TVM's JSONDatabase, the oracle: the
same answers to every query on files either wrote, the same bytes written for the same commits, and the same
workloads found when a file holds a module twice or a stored hash this environment does not compute."""

from __future__ import annotations

import json
import os
import shutil

import pytest

tvm = pytest.importorskip("tvm")

from tvm import te  # noqa: E402
from tvm.s_tir import Schedule  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402

from prune_compile.backends.tvm.tuning import DATABASE_FILES  # noqa: E402
from prune_compile.backends.tvm.tuning_database import LazyJSONDatabase, dumps, open_database  # noqa: E402
from prune_compile.errors import BackendError  # noqa: E402

# run times per record: ranked by mean, ties in commit order; the failure stub, none and an empty list are invalid
RUN_SECS = [[3e-4], [1e-4, 2e-4], [1.5e-4], [1e10], None, [], [1e10, 2e-4], [1.5e-4], [7e-5]]


def workload_module(rows: int):
    a = te.placeholder((rows, 16), name="a")
    return tvm.IRModule({"main": te.create_prim_func([a, te.compute((rows, 16), lambda i, j: a[i, j] * 2,
                                                                     name="b")])})


def _schedules(mod) -> list:
    """Traces of every kind a record may hold: splits (bools held by value in their attributes), an empty trace (an
    invalid record whatever its run times), a float and a bool IntImm annotation and a layout transform (an
    IndexMap)."""
    traces = []
    for factor in (2, 4, None, 8):
        sch = Schedule(mod)
        if factor:
            sch.split(sch.get_loops(sch.get_sblock("b"))[1], [None, factor])
        traces.append(sch.trace)
    sch = Schedule(mod)
    block = sch.get_sblock("b")
    sch.annotate(block, "weight", 0.1)
    sch.annotate(block, "flag", tvm.tirx.IntImm("bool", 1))
    sch.transform_layout(block, ("write", 0), lambda x, y: (y, x))
    traces.append(sch.trace)
    return traces


def commit_all(database, mods) -> None:
    """Every workload, then records for them in turns (so each workload's records are interleaved in the file)."""
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    workloads = [database.commit_workload(mod) for mod in mods]
    traces = [_schedules(mod) for mod in mods]
    for i, run_secs in enumerate(RUN_SECS):
        for workload, options in zip(workloads, traces, strict=True):
            database.commit_tuning_record(ms.database.TuningRecord(options[i % len(options)], workload, run_secs,
                                                                   target, None))


def database_paths(directory) -> list[str]:
    return [os.path.join(directory, f) for f in DATABASE_FILES]


def _answers(database, mods) -> list:
    """Everything MetaSchedule and our tuning ask a database, as comparable text."""
    def text(records):
        return [dumps(ms._ffi_api.TuningRecordAsJSON(r)) for r in records]

    answers = [len(database)]
    for mod in mods:
        answers.append(database.has_workload(mod))
        if database.has_workload(mod):
            workload = database.commit_workload(mod)
            answers += [text(database.get_top_k(workload, k)) for k in (0, 1, 2, 5, 100)]
            answers.append(database.valid_means(mod) if isinstance(database, LazyJSONDatabase) else
                           [sum(s.value for s in r.run_secs) / len(r.run_secs)
                            for r in database.get_top_k(workload, 1 << 30)])
    return [*answers, text(database.get_all_tuning_records())]  # last: it reads every workload


def test_it_answers_and_writes_as_json_database_does(tmp_path) -> None:
    """The same commits through TVM's JSONDatabase and through ours write the same bytes, and each answers every
    query the same on files the other wrote (reopened, and while committing); a module never committed is absent."""
    mods = [workload_module(rows) for rows in (8, 12)]
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    theirs.mkdir(), ours.mkdir()
    json_db = ms.database.JSONDatabase(*database_paths(theirs))
    commit_all(json_db, mods)
    lazy = open_database(*database_paths(ours))
    assert isinstance(lazy, LazyJSONDatabase)
    commit_all(lazy, mods)
    for theirs_file, ours_file in zip(database_paths(theirs), database_paths(ours), strict=True):
        assert open(theirs_file, "rb").read() == open(ours_file, "rb").read()
    probe = [*mods, workload_module(20)]
    expected = _answers(json_db, probe)
    assert expected[0] == 2 * len(RUN_SECS) and expected[-2] is False  # the unknown module
    assert _answers(lazy, probe) == expected  # after its own commits
    # Read back, a bool IntImm annotation is a bool held by value (TVM's own round trip): compare read with read.
    expected = _answers(ms.database.JSONDatabase(*database_paths(theirs)), probe)
    assert _answers(open_database(*database_paths(theirs)), probe) == expected  # reading what TVM wrote
    assert _answers(ms.database.JSONDatabase(*database_paths(ours)), probe) == expected  # TVM reading what we wrote
    # Both append to the files they opened, ours to records it has not read yet: the same bytes and answers again.
    shutil.copytree(ours, theirs, dirs_exist_ok=True)
    json_db, lazy = ms.database.JSONDatabase(*database_paths(theirs)), open_database(*database_paths(ours))
    commit_all(json_db, mods[1:])
    commit_all(lazy, mods[1:])
    for theirs_file, ours_file in zip(database_paths(theirs), database_paths(ours), strict=True):
        assert open(theirs_file, "rb").read() == open(ours_file, "rb").read()
    assert _answers(lazy, probe) == _answers(json_db, probe)


def test_a_string_neither_reader_reads_back_is_written_as_tvm_writes_it(tmp_path) -> None:
    """TVM writes a byte outside printable ASCII as \\xNN, which its own reader (and JSON) rejects; ours writes the
    same bytes, and names the line when the record is asked for instead of failing to open."""
    mod = workload_module(8)
    sch = Schedule(mod)
    sch.annotate(sch.get_sblock("b"), "note", "d\u00e9j\u00e0")
    for directory, database in ((tmp_path / "theirs", ms.database.JSONDatabase), (tmp_path / "ours", open_database)):
        directory.mkdir()
        written = database(*database_paths(directory))
        written.commit_tuning_record(ms.database.TuningRecord(sch.trace, written.commit_workload(mod), [1e-4]))
    ours, theirs = database_paths(tmp_path / "ours"), database_paths(tmp_path / "theirs")
    assert b"\\xC3\\xA9" in open(ours[1], "rb").read()
    assert open(ours[1], "rb").read() == open(theirs[1], "rb").read()
    with pytest.raises(Exception, match="escape"):
        ms.database.JSONDatabase(*theirs)
    with pytest.raises(BackendError, match=f"{ours[1]}, line 1: not a tuning record"):
        open_database(*ours).valid_means(mod)


def test_a_module_on_two_lines_and_a_foreign_stored_hash(tmp_path) -> None:
    """Workload lines as another environment or an older file may hold them: a stored hash this environment does
    not compute (JSONDatabase rehashes on opening) and the same module twice (its records are those of both lines).
    Both databases find the same workloads and records."""
    mods = [workload_module(rows) for rows in (8, 12)]
    commit_all(ms.database.JSONDatabase(*database_paths(tmp_path)), mods)
    workload_file, record_file = database_paths(tmp_path)
    lines = open(workload_file).read().splitlines()
    stored, b64 = json.loads(lines[0])
    lines[0] = json.dumps([str(int(stored) ^ 1), b64], separators=(",", ":"))
    with open(workload_file, "w") as f:
        f.write("\n".join([*lines, lines[1]]) + "\n")  # the second module again, on line 3
    first_record_of_second = next(line for line in open(record_file) if line.startswith("[1,"))
    assert "[0.00029999" in first_record_of_second
    with open(record_file, "a") as f:  # a record of line 3, the fastest of the second module
        f.write("[2," + first_record_of_second[3:].replace("[0.00029999", "[0.00000999"))
    probe = [*mods, workload_module(20)]
    expected = _answers(ms.database.JSONDatabase(*database_paths(tmp_path)), probe)
    assert expected[1] is True  # the module whose stored hash is foreign
    assert _answers(open_database(*database_paths(tmp_path)), probe) == expected


def test_bad_lines_are_named_and_a_trace_is_replayed_only_when_asked_for(tmp_path) -> None:
    """Opening reads no trace: a record that does not replay on its workload is reported (file, record) only when
    its workload's records are asked for, and other workloads are answered. Lines that are not records, records of
    a workload the file does not have, a cut record and a cut workload fail with the file and the line."""
    mods = [workload_module(rows) for rows in (8, 12)]
    json_db = ms.database.JSONDatabase(*database_paths(tmp_path))
    commit_all(json_db, mods)
    valid = len(json_db.get_top_k(json_db.commit_workload(mods[0]), 100))
    record_file = database_paths(tmp_path)[1]
    good = open(record_file).read()
    with open(record_file, "a") as f:
        f.write(next(line for line in good.splitlines(keepends=True) if line.startswith("[1,"))
                .replace('["b","main"]', '["no_such_block","main"]'))
    lazy = open_database(*database_paths(tmp_path))
    assert len(lazy.get_top_k(lazy.commit_workload(mods[0]), 100)) == valid > 0
    # (raised inside a call from TVM's C++, the error comes back a RuntimeError with our message)
    with pytest.raises(Exception, match=f"{record_file}, line {2 * len(RUN_SECS) + 1}: the record does not"):
        lazy.get_top_k(lazy.commit_workload(mods[1]), 100)
    for bad, why in (('{"not": "a record"}\n', "line 19: not a tuning record"),
                     (good.splitlines(keepends=True)[0].replace("[0,", "[7,", 1), "line 19: its workload index"),
                     (good.splitlines()[0][:200] + "\n", "line 19: not a tuning record")):
        with open(record_file, "w") as f:
            f.write(good + bad)
        with pytest.raises(BackendError, match=f"{record_file}, {why}"):
            open_database(*database_paths(tmp_path)).valid_means(mods[0])
    workload_file = database_paths(tmp_path)[0]
    first, second = open(workload_file).read().splitlines()
    with open(workload_file, "w") as f:
        f.write(f"{first}\n{second[:200]}\n")
    with pytest.raises(BackendError, match=f"{workload_file}, line 2: "):
        open_database(*database_paths(tmp_path)).valid_means(mods[1])
