"""Long-context retrieval evaluation on the training mesh: passkey and needle cases, scored greedily.

See :mod:`megaring.retrieval.cases` (what a case is), :mod:`megaring.retrieval.score` (the scoring
at any layout) and :mod:`megaring.retrieval.tasks` (the tasks of a run).
"""

from megaring.retrieval.cases import RETRIEVAL_TASKS, Case, CaseError
from megaring.retrieval.checks import retrieval_problems
from megaring.retrieval.tasks import RetrievalTasks, retrieval_metrics

__all__ = ["RETRIEVAL_TASKS", "Case", "CaseError", "RetrievalTasks", "retrieval_metrics", "retrieval_problems"]
