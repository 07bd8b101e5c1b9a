#!/bin/bash
# Pool the cells computed by the parallel studies (a: e2e+webnlg, b: xsum, c/d: webnlg long s2/s1) into one
# study folder of the whole grid (studies/paper.toml), then write its report. Every cell's settings are the
# grid's own for its task, so the copied cells are what the whole grid computes.
set -e
cd /work/studyrun
rm -rf study-paper
PYTHONPATH=/work/studysrc/src /work/main/.venv/bin/python - <<'PY'
import json, shutil
from pathlib import Path
from lorabound import pipeline
from lorabound.study import GRID_MARKER, _grid_record, load_grid
grid = load_grid("/work/studysrc/studies/paper.toml")
out = Path("/work/studyrun/study-paper")
out.mkdir()
from lorabound.files import holds_folder_locks
holds_folder_locks(lambda: pipeline._claim_folder(out, GRID_MARKER, _grid_record(grid), False))()
(out / "cells").mkdir(exist_ok=True)
sources = {}
for name in ("study-a", "study-b", "study-c", "study-d"):
    for cell in sorted(Path(name, "cells").glob("*")):
        record = cell / "cell.json"
        if record.is_file() and json.loads(record.read_text())["status"] == "ok":
            sources[cell.name] = cell
for cell in grid.cells():
    src = sources[cell.id]  # KeyError: a cell is missing
    dst = out / "cells" / cell.id
    shutil.copytree(src, dst, symlinks=True)
    record = json.loads((dst / "cell.json").read_text())
    record["adapter"] = str(dst / "adapter")
    (dst / "cell.json").write_text(json.dumps(record, indent=2))
print("cells:", len(grid.cells()))
PY
PYTHONPATH=/work/studysrc/src /work/main/.venv/bin/python -m lorabound.cli study --threads 2 --grid /work/studysrc/studies/paper.toml --out /work/studyrun/study-paper
