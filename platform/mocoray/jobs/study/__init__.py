"""`mocoray study`: a sweep, downstream runs (linear, detection) on its trials, and which configuration transfers best."""

from .downstream import DownstreamFault
from .driver import StudyFailed, StudyResult, load_study_dir, run_study

__all__ = ["DownstreamFault", "StudyFailed", "StudyResult", "load_study_dir", "run_study"]
