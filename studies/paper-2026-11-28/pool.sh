#!/bin/bash
# Pool the cells computed by the parallel studies (a: e2e+webnlg, b: xsum, c/d: webnlg long s2/s1 -- the r = 16
# cells; e: e2e+xsum long-r8, f: webnlg long-r8) into one study folder of the whole grid (studies/paper.toml), then
# write its report. Every cell's settings are the grid's own for its task and training, so the copied cells are
# what the whole grid computes. Run from the folder holding study-a .. study-f, with lorabound importable.
set -e
GRID=${GRID:-studies/paper.toml}
OUT=${OUT:-study-paper}
rm -rf "$OUT"
python - "$GRID" "$OUT" <<'PY'
import json, shutil, sys
from pathlib import Path
from lorabound.files import holds_folder_locks
from lorabound.run_folders import claim_folder
from lorabound.study import GRID_MARKER, _grid_record, load_grid
grid, out = load_grid(sys.argv[1]), Path(sys.argv[2])
out.mkdir()
holds_folder_locks(lambda: claim_folder(out, GRID_MARKER, _grid_record(grid), False))()
(out / "cells").mkdir(exist_ok=True)
sources = {}
for study in sorted(Path(".").glob("study-?")):
    for cell in sorted((study / "cells").glob("*")):
        record = cell / "cell.json"
        if record.is_file() and json.loads(record.read_text())["status"] == "ok":
            sources[cell.name] = cell
for cell in grid.cells():
    dst = out / "cells" / cell.id
    shutil.copytree(sources[cell.id], dst, symlinks=True)  # KeyError: that cell is not finished anywhere
    record = json.loads((dst / "cell.json").read_text())
    record["adapter"] = str(dst / "adapter")
    (dst / "cell.json").write_text(json.dumps(record, indent=2))
print("cells:", len(grid.cells()))
PY
python -m lorabound.cli study --threads 2 --grid "$GRID" --out "$OUT"
