"""How fast `bnet data build` turns a 1024x1024, 3000-frame video into a session.

Builds the SLEAP fly video (h264, 1024x1024, 3000 frames, 25 fps) with its labels at 128 px,
and, side by side in the same run, times ffmpeg alone decoding the video to raw gray frames
(the floor any build has to pay), and prints both and their ratio.

    python bench/data_build.py [--video V] [--labels L] [--pixels 128]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path
from machine import describe  # the machine the figures were taken on

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "sleap_flies"


def decode_only(video: Path) -> float:
    import imageio_ffmpeg

    started = time.perf_counter()
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(video), "-f", "rawvideo",
                    "-pix_fmt", "gray", "-"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    from bnet.data.build import BuildConfig, build_session

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", type=Path, default=SHARED / "20190128_113421.120s.mp4")
    parser.add_argument("--labels", type=Path, default=SHARED / "predictions.analysis.h5")
    parser.add_argument("--pixels", type=int, default=128)
    args = parser.parse_args()
    print(describe(), flush=True)
    if not args.video.is_file():
        raise SystemExit(f"{args.video}: no such video (pass --video)")
    with tempfile.TemporaryDirectory() as tmp:
        floor = decode_only(args.video)
        summary = build_session(BuildConfig(out=Path(tmp) / "s.hdf5", videos=[args.video], labels=args.labels,
                                            y_pixels=args.pixels, x_pixels=args.pixels, trial_length=100),
                                echo=lambda line: None)
        size = (Path(tmp) / "s.hdf5").stat().st_size / 2**20
    frames = summary.n_trials * summary.trial_length
    print(f"video {args.video.name}: {summary.n_frames_source} frames")
    print(f"ffmpeg decode alone        {floor:6.1f} s  ({summary.n_frames_source / floor:6.0f} frames/s)")
    print(f"bnet data build at {args.pixels} px  {summary.seconds:6.1f} s  ({frames / summary.seconds:6.0f} frames/s), "
          f"{size:.0f} MiB written")
    print(f"build / decode             {summary.seconds / floor:6.2f}x")


if __name__ == "__main__":
    main()
