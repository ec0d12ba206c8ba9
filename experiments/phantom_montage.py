"""Renders a PNG montage of jaxmed's synthetic brain phantoms.

  python experiments/phantom_montage.py --out docs/phantoms.png

One row per subject: T1, T1c, T2 and FLAIR of the middle lesion-containing axial slice, then the
label over FLAIR (red 1 necrotic / non-enhancing core or WMH, green 2 edema, yellow 4 enhancing).
"""

from __future__ import annotations

import argparse
import time

from jaxmed.data import synthetic


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="docs/phantoms.png", help="PNG path to write.")
  parser.add_argument("--num-subjects", type=int, default=4, help="Rows of the montage.")
  parser.add_argument("--seed", type=int, default=0, help="Seed of `make_subjects`.")
  parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 64), metavar=("D", "H", "W"),
                      help="Volume shape.")
  parser.add_argument("--pathology", default="tumour", choices=synthetic.PATHOLOGIES)
  parser.add_argument("--noise", type=float, default=0.03, help="Rician noise level.")
  args = parser.parse_args(argv)

  start = time.perf_counter()
  subjects = synthetic.make_subjects(args.num_subjects, seed=args.seed, shape=tuple(args.shape),
                                     pathology=args.pathology, noise=args.noise)
  elapsed = time.perf_counter() - start
  for subject in subjects:
    print(f"{subject.subject_id}: grade {subject.grade}, "
          f"brain {subject.brain_mask.mean():.1%}, lesion {(subject.label > 0).mean():.2%}")
  print(f"made {len(subjects)} subjects of shape {tuple(args.shape)} in {elapsed:.2f} s")
  synthetic.save_montage(subjects, args.out, num_subjects=args.num_subjects)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
