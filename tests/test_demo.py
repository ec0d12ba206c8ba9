import os

from jaxmed import demo


def test_quick_demo_writes_report_and_table(tmp_path, capsys):
  summary = demo.run_demo(str(tmp_path), quick=True, progress=False)
  assert set(summary) == {"pretrained", "scratch"}
  assert set(summary["pretrained"]) == {"WT", "TC", "ET", "All"}
  out = capsys.readouterr().out
  assert "| in-painting pre-trained |" in out and "| from scratch |" in out
  for name in ("report.md", "phantoms.png", "inpainting.png", "segmentation.png", "dice.json"):
    assert os.path.getsize(tmp_path / name) > 0
  report = open(tmp_path / "report.md").read()
  assert "![segmentation](segmentation.png)" in report
