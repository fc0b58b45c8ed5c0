# Storage for the job: one private, versioned, KMS-encrypted bucket with prefixes
#   data/   models/   (inputs, read-only for the job's roles)
#   runs/sagemaker/   runs/eks/   (what each platform's role may write)
# and the ECR repository for the image. IAM roles are in iam.tf.

data "aws_caller_identity" "current" {}
data "aws_region" "current" {}
data "aws_partition" "current" {}

locals {
  account_id  = data.aws_caller_identity.current.account_id
  region      = data.aws_region.current.name
  partition   = data.aws_partition.current.partition
  bucket_name = coalesce(var.bucket_name, "${var.name}-${local.account_id}-${local.region}")
  tags        = merge({ "app.kubernetes.io/part-of" = var.name, "managed-by" = "terraform" }, var.tags)
}

# ---------------------------------------------------------------------------------------------
# One customer-managed key for the bucket and the repository: its policy, not only IAM, decides
# who can read the data; rotation is yearly.

resource "aws_kms_key" "this" {
  description             = "${var.name}: data, models, runs and images"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
  tags                    = local.tags
}

resource "aws_kms_alias" "this" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.this.key_id
}

# The account administers the key (the AWS default key policy); the job's roles get their use of it
# through their own IAM policies (iam.tf), and S3 and ECR use it on their behalf.
data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_109:A key policy's "*" resource is the key itself; this is AWS's default key policy, giving the account (its IAM policies) control.
  #checkov:skip=CKV_AWS_111:Same: the default key policy; no principal outside this account.
  #checkov:skip=CKV_AWS_356:In a key policy, "*" can only mean this key.
  statement {
    sid       = "AccountAdministersTheKey"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }
}

# ---------------------------------------------------------------------------------------------

resource "aws_s3_bucket" "this" {
  #checkov:skip=CKV_AWS_18:Server access logs need a second bucket with its own retention, account-specific; CloudTrail data events are the usual audit trail for this bucket.
  #checkov:skip=CKV_AWS_144:Cross-region replication doubles the cost of multi-GB models and checkpoints; runs are reproducible from data/ and models/.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events; the job reports through its exit code and report/.
  bucket        = local.bucket_name
  force_destroy = var.force_destroy
  tags          = local.tags
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket                  = aws_s3_bucket.this.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

# Versioning: an overwritten or deleted model, CSV or checkpoint can be recovered (for
# checkpoint_retention_days, see the lifecycle rules).
resource "aws_s3_bucket_versioning" "this" {
  bucket = aws_s3_bucket.this.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.this.arn
    }
    # S3 Bucket Keys: one KMS call per object-ish instead of per part (checkpoints are multipart).
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  # Old checkpoints: the job keeps the newest train.keep_checkpoints and deletes the rest, which in a
  # versioned bucket only hides them. Expire those hidden versions, and the delete markers left over.
  rule {
    id     = "expire-old-checkpoints"
    status = "Enabled"
    filter {
      prefix = "runs/"
    }
    noncurrent_version_expiration {
      noncurrent_days = var.checkpoint_retention_days
    }
    expiration {
      expired_object_delete_marker = true
    }
  }

  # Everywhere: uploads cut off by a preemption or a killed pod leave invisible, billed parts.
  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 3
    }
  }

  # Optional: whole runs expire (the rule exists either way, disabled while run_expiration_days is
  # null; a static rule rather than a dynamic block keeps the configuration readable to checkov).
  rule {
    id     = "expire-runs"
    status = var.run_expiration_days == null ? "Disabled" : "Enabled"
    filter {
      prefix = "runs/"
    }
    expiration {
      days = coalesce(var.run_expiration_days, 36500)
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

# TLS only: refuse any request made over plain HTTP, whoever makes it.
data "aws_iam_policy_document" "bucket" {
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.this.arn,
      "${aws_s3_bucket.this.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  bucket = aws_s3_bucket.this.id
  policy = data.aws_iam_policy_document.bucket.json

  depends_on = [aws_s3_bucket_public_access_block.this]
}

# ---------------------------------------------------------------------------------------------

resource "aws_ecr_repository" "this" {
  name                 = var.name
  image_tag_mutability = "IMMUTABLE"
  force_delete         = var.force_destroy
  tags                 = local.tags

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.this.arn
  }
}

# Untagged images (superseded builds) go after two weeks; tagged releases stay.
resource "aws_ecr_lifecycle_policy" "this" {
  repository = aws_ecr_repository.this.name
  policy = jsonencode({
    rules = [{
      rulePriority = 1
      description  = "Expire untagged images after 14 days"
      selection = {
        tagStatus   = "untagged"
        countType   = "sinceImagePushed"
        countUnit   = "days"
        countNumber = 14
      }
      action = { type = "expire" }
    }]
  })
}
