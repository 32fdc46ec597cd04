"""Folder names of the feedback queue, shared by serving (writer) and the pipeline (reader and mover).

Below a queue root (local folder or ``gs://`` prefix): ``pending/<label>/<sha256>.<ext>`` (images waiting for
a run), ``records/<feedback_id>.json`` (one record per correction), ``consumed/<run>/<label>/...`` (images a
run trained on; never deleted), ``quarantine/<sha256>.json`` (an image a run found under different labels,
held out of training), ``resolutions/<sha256>.json`` (a person's answer to a quarantined image) and
``rejected/<label>/...`` (the copies a resolution turned down; never deleted), ``predictions/<model>/...``
(the prediction log, see :mod:`storage.predictions`) and ``review/`` (low-confidence predictions waiting
for a label).
"""

from __future__ import annotations

PENDING = "pending"
RECORDS = "records"
CONSUMED = "consumed"
QUARANTINE = "quarantine"
RESOLUTIONS = "resolutions"
REJECTED = "rejected"
PREDICTIONS = "predictions"
REVIEW = "review"
