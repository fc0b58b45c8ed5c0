"""Shared fixtures: moto's S3 server and `store_root`, which runs a test once on a folder and once on S3."""

from tests.s3server import make_bucket, moto_server, s3_bucket, store_root  # noqa: F401
