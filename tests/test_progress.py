"""Progress where stderr is not a terminal (cron, systemd, CI, a pipe): plain lines, never silence."""

from anomaly_service.progress import progress_bar


def test_a_step_logs_its_start_and_end_as_lines_when_stderr_is_not_a_terminal(capsys):
    with progress_bar(True, total=50, desc="leave-one-out", unit="img") as bar:
        for _ in range(50):
            bar.set_postfix(loss=0.5)  # refreshes at every step on a terminal
            bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("leave-one-out:   0%") and "50/50" in lines[1]
    assert not any("\r" in x or "\x1b" in x for x in lines)
    with progress_bar(False, total=5) as bar:  # -q: nothing at all
        bar.update(5)
    assert capsys.readouterr().err == ""


def test_loading_no_images_shows_no_bar(capsys):
    """An update without known defects logged a bar of nothing ("loading: 0img [00:00, ?img/s]") on every run."""
    from anomaly_service.images import ImageLimits
    from anomaly_service.training_set import digest_inputs

    assert digest_inputs([], None, ImageLimits(), True, "defect") == ([], [], [])
    assert capsys.readouterr().err == ""


def test_a_step_without_a_total_logs_its_end_too(capsys):
    """`evaluate` scores a stream of test photos (no total, so never "100%"): its log said the step began and never
    that it ended; so did any step that ended short of its total (photos skipped, a stop)."""
    with progress_bar(True, iter(range(7)), desc="evaluate", unit="img") as bar:
        for _ in bar:
            pass
    with progress_bar(True, total=9, desc="features", unit="img") as bar:
        bar.update(8)  # one photo did not decode
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith("evaluate: 0img") and lines[1].startswith("evaluate: 7img")
    assert lines[2].startswith("features:   0%") and "8/9" in lines[3]


def test_a_bar_refreshed_at_its_end_logs_its_end_once(capsys):
    """The whole-image branch's bar sets its losses after each epoch's step, so its last refresh is at 100% and its
    close draws 100% again with another rate: the log said "autoencoder (global): 100%" twice, as if it trained
    twice."""
    with progress_bar(True, total=6, desc="autoencoder (global)", unit="epoch") as bar:
        for _ in range(6):
            bar.update(1)
            bar.set_postfix(train="0.1")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "0/6" in lines[0] and "6/6" in lines[1] and "train=0.1" in lines[1], lines
