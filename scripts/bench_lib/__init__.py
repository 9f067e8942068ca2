"""Helpers of scripts/bench.py: `--store s3` (s3bench), its SeaweedFS (seaweed) and its boto3
co-process (s3client, run under the test tools' venv)."""
