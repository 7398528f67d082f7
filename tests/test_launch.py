"""The code the job exits with when it started torchrun: what its failed ranks reported in torchrun's error files
(launch.report, called by entrypoint.fail), read back through torchrun's own ProcessFailure."""

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from job import launch


@pytest.fixture
def failure(tmp_path, monkeypatch):
    def make(rank: int, exitcode: int, reported: int | None = None) -> ProcessFailure:
        path = tmp_path / f"rank-{rank}.json"
        if reported is not None:
            monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
            launch.report(reported, "DatasetInvalid: d.jsonl:2: invalid JSON")
        return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))

    return make


def test_the_reported_code_wins_over_an_abort_on_the_way_out(failure):
    failures = {0: failure(0, 65, reported=65), 1: failure(1, -6, reported=65)}
    assert failures[1].message["message"] == "DatasetInvalid: d.jsonl:2: invalid JSON", "torchrun reads it back"
    assert launch.exit_code(failures) == 65


def test_a_rank_killed_by_torchrun_after_another_failed_does_not_name_the_code(failure):
    # Rank 0 waited in a collective, so torchrun's SIGTERM could not stop it: SIGKILL after the shutdown timeout.
    assert launch.exit_code({0: failure(0, -9), 1: failure(1, 70, reported=70)}) == 70
    assert launch.exit_code({0: failure(0, 143, reported=143), 1: failure(1, 65, reported=65)}) == 65


def test_without_reports_the_lowest_rank_that_was_not_stopped_names_the_code(failure):
    assert launch.exit_code({0: failure(0, -15), 1: failure(1, 1)}) == 1
    assert launch.exit_code({0: failure(0, -6), 1: failure(1, 1)}) == 134
    assert launch.exit_code({0: failure(0, -15), 1: failure(1, -15)}) == 143
    assert launch.exit_code({0: failure(0, 143, reported=143)}) == 143
