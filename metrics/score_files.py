"""``scores.json`` and ``scores.csv``: one scoring's numbers and each image's row, written beside the images.

Validation, ``test`` and ``likeness score`` all write them, so a step folder can be handed in, compared or read
back by a script without TensorBoard. Undefined numbers (no face in any image, CLIP skipped) are ``null`` in the
JSON and empty cells in the CSV, never 0: a 0 face distance would read as a perfect score.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from callbacks.prompt_grid import save_png
from datamodules.files import write_atomically
from metrics.identity_scorer import IdentityScores

SCORES_JSON = "scores.json"
SCORES_CSV = "scores.csv"
GRID_PNG = "grid.png"
CSV_COLUMNS = ("file", "prompt", "face_found", "distance", "verdict", "clip_score")


def _number(value: float | None) -> float | None:
    """JSON has no NaN: an undefined number is ``null``."""
    return None if value is None or math.isnan(value) else float(value)


def _cell(value: float | None) -> str:
    # repr: every digit, so the CSV's rows average to the JSON's numbers exactly.
    return "" if value is None or math.isnan(value) else repr(float(value))


class ScoreFiles:
    """Writes ``scores.json``, ``scores.csv`` and (given one) ``grid.png`` into one folder, each atomically.

    ``scores.json`` holds the four numbers (face distance, identity match rate, CLIP score, faceless count), the
    rubric points or why there are none, the face model, its threshold, the image counts, the time per stage and
    the settings that produced them; ``scores.csv`` one row per image with :data:`CSV_COLUMNS`.

    Args:
        folder: where the files go, beside the images they describe (created when missing).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _relative(self, file: str | Path) -> str:
        """A file's name as the rows give it: relative to the folder (which can then move with its images), with
        ``..`` when outside it (``likeness score --out`` elsewhere: it was relative to the working directory)."""
        path = Path(file).resolve()
        try:
            return Path(os.path.relpath(path, self.folder.resolve())).as_posix()
        except ValueError:  # another drive (Windows): no relative path exists
            return str(path)

    @staticmethod
    def summary(scores: IdentityScores) -> dict[str, Any]:
        """The JSON's numbers: the four the HW and issue #11 ask for, then what they rest on."""
        defined = not math.isnan(scores.face_distance)
        rubric = scores.rubric if defined else "rubric n/a: no face in any image"
        return {
            "face_distance": _number(scores.face_distance),
            "identity_match_rate": _number(scores.identity_match_rate),
            "clip_score": _number(scores.clip_score),
            "faceless_count": scores.faceless_count,
            "rubric_points": scores.rubric_points if defined else None,
            "rubric": rubric,
            "the_person": sum(scores.matches),
            "images": scores.images,
            "faceless_rate": _number(scores.faceless_rate),
            "face_model": scores.face_model,
            "threshold": scores.threshold,
        }

    def write(
        self,
        scores: IdentityScores,
        files: Sequence[str | Path],
        prompts: Sequence[str],
        settings: Mapping[str, Any],
        grid: Image.Image | None = None,
    ) -> dict[str, Path]:
        """Write the files for ``scores`` of the images ``files`` generated from ``prompts``.

        Args:
            scores: what :class:`~metrics.identity_scorer.IdentityScorer` gave for the images, in file order.
            files: the image files, one per score.
            prompts: each image's prompt.
            settings: what was scored and how (photos folder, prompt file, face model, CLIP model, ...).
            grid: the captioned grid (:func:`callbacks.prompt_grid.prompt_grid`), saved as ``grid.png``.

        Returns:
            ``{"json": ..., "csv": ...}`` (and ``"grid"``) paths.
        """
        if not len(files) == len(prompts) == scores.images:
            raise ValueError(
                f"ScoreFiles: {len(files)} files, {len(prompts)} prompts and {scores.images} scores; give one of each "
                "per image."
            )
        rows = io.StringIO(newline="")
        writer = csv.writer(rows, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for file, prompt, distance, verdict, clip in zip(
            files, prompts, scores.distances, scores.verdicts, scores.clip_scores or [None] * scores.images, strict=True
        ):
            found = "true" if distance is not None else "false"
            writer.writerow([self._relative(file), prompt, found, _cell(distance), verdict, _cell(clip)])
        document = self.summary(scores) | {
            "seconds": {stage: round(s, 3) for stage, s in scores.seconds.items()},
            "settings": dict(settings),
            "csv": SCORES_CSV,
        }
        out = {"json": self.folder / SCORES_JSON, "csv": self.folder / SCORES_CSV}
        write_atomically(out["csv"], rows.getvalue().encode("utf-8"))
        if grid is not None:
            out["grid"] = save_png(self.folder / GRID_PNG, grid, {})
        # The JSON last: its presence says the other files are complete.
        text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False, default=str)
        write_atomically(out["json"], (text + "\n").encode("utf-8"))
        return out
