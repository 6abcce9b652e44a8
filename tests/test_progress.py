from bnet.progress import Progress


def test_plain_lines_at_each_tenth_and_at_both_ends():
    lines = []
    progress = Progress(100, "  trial 0 ae epoch", lines.append, terminal=False)
    for epoch in range(1, 101):
        progress.update(at=epoch, message=f"val_loss {1 / epoch:.3g}")
    assert lines[0] == "  trial 0 ae epoch 1/100  val_loss 1" and lines[-1] == "  trial 0 ae epoch 100/100  val_loss 0.01"
    assert [int(line.split()[4].split("/")[0]) for line in lines] == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    few = []
    short = Progress(5, "x", few.append, terminal=False)
    for _ in range(5):
        short.update()
    assert few == ["x 1/5", "x 2/5", "x 3/5", "x 4/5", "x 5/5"]


def test_frames_in_chunks_still_report_each_tenth():
    lines = []
    progress = Progress(995, "frames written", lines.append, terminal=False)
    for _ in range(19):
        progress.update(50)
    assert lines[:3] == ["frames written 50/995", "frames written 100/995", "frames written 200/995"]
    assert len(lines) == 10 and lines[-1] == "frames written 900/995"  # 950 is short of the next tenth


def test_a_terminal_gets_a_bar_and_no_lines(capsys):
    lines = []
    progress = Progress(10, "trial 0 ae epoch", lines.append, terminal=True)
    for _ in range(10):
        progress.update(message="val_loss 0.1")
    progress.close()
    assert lines == [] and "trial 0 ae epoch" in capsys.readouterr().err
