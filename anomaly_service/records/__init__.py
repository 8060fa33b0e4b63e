"""Inspection records: every scored image remembered in a real database, its photo and heatmap in a file store.

``models`` (the tables and the id scheme), ``store`` (:class:`RecordStore`: schema upgrades, writes, queries,
reviews, stats, exports, retention), ``files`` (the content-addressed file store), ``recorder`` (the bounded
buffer and background writer that keep recording off the request path), ``migrations/`` (the Alembic scripts,
the only thing that creates or changes the schema).
"""

from .models import (FILES_EXPIRED, FILES_FAILED, FILES_NOT_KEPT, FILES_REMOVED, FILES_STORED, VERDICTS, Inspection,
                     Review, new_id)
from .recorder import PartContext, PendingRecord, Recorder
from .store import Filters, RecordStore, ReviewConflict, SchemaError, UndoRefused, UnknownReview, inspection_dict

__all__ = ["FILES_EXPIRED", "FILES_FAILED", "FILES_NOT_KEPT", "FILES_REMOVED", "FILES_STORED", "VERDICTS", "Filters",
           "Inspection", "PartContext", "PendingRecord", "RecordStore", "Recorder", "Review",
           "ReviewConflict", "SchemaError", "UndoRefused", "UnknownReview", "inspection_dict", "new_id"]
