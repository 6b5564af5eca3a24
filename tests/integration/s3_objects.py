"""Reading back what a job wrote to S3, straight through boto3 (not through genmodels.storage)."""

from __future__ import annotations


def s3_objects(url: str) -> dict[str, bytes]:
    """Every object under ``s3://bucket/prefix``, by key relative to the prefix."""
    import boto3

    bucket, _, prefix = url[len("s3://"):].partition("/")
    s3 = boto3.client("s3")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
