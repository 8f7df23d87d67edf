"""The judges of every DICOM object the node writes: dicom3tools' ``dciodvfy`` (the IOD and its modules) and
PixelMed's ``DicomSRValidator`` (the SR content tree against its templates and context groups).

Each function returns the validator's "Error" lines; an empty list means the object passed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# PixelMed's template checks are XPath expressions beyond the JDK's default limits.
_JAVA_XPATH_LIMITS = [
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
]


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines ``dciodvfy -new`` prints for the file at ``path``."""
    completed = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=120)
    return _error_lines(completed.stdout + completed.stderr)


def sr_validator_errors(path: Path) -> list[str]:
    """The ``Error`` lines PixelMed's DicomSRValidator prints for the SR file at ``path``, template checks on."""
    completed = subprocess.run(
        [
            "java",
            *_JAVA_XPATH_LIMITS,
            "-cp",
            str(PIXELMED_JAR),
            "com.pixelmed.validate.DicomSRValidator",
            "-checktemplateid",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = completed.stdout + completed.stderr
    if completed.returncode != 0 and not output.strip():
        return [f"DicomSRValidator exited with {completed.returncode} and said nothing"]
    return _error_lines(output) + [line for line in output.splitlines() if "Exception" in line]


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.lstrip().startswith("Error")]
