# Two roles, one per platform, each limited to the inputs (read) and its own runs prefix (write).

locals {
  bucket_arn = aws_s3_bucket.this.arn
  # "arn:aws:iam::123:oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/ABC" -> "oidc.eks.us-east-1.amazonaws.com/id/ABC"
  oidc_issuer = var.eks_oidc_provider_arn == null ? null : element(split("oidc-provider/", var.eks_oidc_provider_arn), 1)

  roles = merge(
    var.create_sagemaker_role ? { sagemaker = var.sagemaker_runs_prefix } : {},
    var.eks_oidc_provider_arn != null ? { eks = var.eks_runs_prefix } : {},
  )
}

# The job's storage rights, for one runs prefix: list and read the inputs, read and write its runs.
data "aws_iam_policy_document" "storage" {
  for_each = local.roles

  statement {
    sid       = "ListOwnPrefixes"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.data_prefix}*", "${var.models_prefix}*", "${each.value}*"]
    }
  }

  statement {
    sid     = "ReadInputs"
    actions = ["s3:GetObject"]
    resources = [
      "${local.bucket_arn}/${var.data_prefix}*",
      "${local.bucket_arn}/${var.models_prefix}*",
    ]
  }

  # Delete: the job prunes checkpoints beyond train.keep_checkpoints. AbortMultipartUpload: a
  # preempted upload is cleaned up on the next start.
  statement {
    sid = "ReadWriteOwnRuns"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${local.bucket_arn}/${each.value}*"]
  }

  statement {
    sid       = "UseTheBucketKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.this.arn]
  }
}

# ---------------------------------------------------------------------------------------------
# SageMaker training: pulls the image from ECR, reads the channels, syncs /opt/ml/checkpoints with
# checkpoint_s3_uri, uploads /opt/ml/model as model.tar.gz, and writes CloudWatch logs.

data "aws_iam_policy_document" "sagemaker_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["sagemaker.amazonaws.com"]
    }
    # Only training jobs of this account (confused-deputy protection).
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

data "aws_iam_policy_document" "sagemaker_platform" {
  count = var.create_sagemaker_role ? 1 : 0

  # GetAuthorizationToken has no resource to restrict (it is not a per-repository action).
  statement {
    sid       = "EcrLogin"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"]
  }

  statement {
    sid = "PullTheImage"
    actions = [
      "ecr:BatchGetImage",
      "ecr:GetDownloadUrlForLayer",
      "ecr:BatchCheckLayerAvailability",
    ]
    resources = [aws_ecr_repository.this.arn]
  }

  statement {
    sid = "TrainingJobLogs"
    actions = [
      "logs:CreateLogGroup",
      "logs:CreateLogStream",
      "logs:PutLogEvents",
      "logs:DescribeLogStreams",
    ]
    resources = [
      "arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:/aws/sagemaker/TrainingJobs",
      "arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:/aws/sagemaker/TrainingJobs:*",
    ]
  }
}

resource "aws_iam_role" "sagemaker" {
  count              = var.create_sagemaker_role ? 1 : 0
  name               = "${var.name}-sagemaker"
  description        = "SageMaker training jobs of ${var.name}: read ${var.data_prefix} and ${var.models_prefix}, write ${var.sagemaker_runs_prefix}"
  assume_role_policy = data.aws_iam_policy_document.sagemaker_trust.json
  tags               = local.tags
}

resource "aws_iam_role_policy" "sagemaker_storage" {
  count  = var.create_sagemaker_role ? 1 : 0
  name   = "storage"
  role   = aws_iam_role.sagemaker[0].id
  policy = data.aws_iam_policy_document.storage["sagemaker"].json
}

resource "aws_iam_role_policy" "sagemaker_platform" {
  count  = var.create_sagemaker_role ? 1 : 0
  name   = "platform"
  role   = aws_iam_role.sagemaker[0].id
  policy = data.aws_iam_policy_document.sagemaker_platform[0].json
}

# ---------------------------------------------------------------------------------------------
# EKS pods through IRSA: only the job's ServiceAccount, through the cluster's OIDC provider. The
# nodes pull the image with their own role, so this one needs storage only.

data "aws_iam_policy_document" "eks_trust" {
  count = var.eks_oidc_provider_arn == null ? 0 : 1

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${var.k8s_namespace}:${var.k8s_service_account}"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "eks" {
  count              = var.eks_oidc_provider_arn == null ? 0 : 1
  name               = "${var.name}-eks"
  description        = "Kubernetes Job ${var.k8s_namespace}/${var.k8s_service_account} of ${var.name} (IRSA): read ${var.data_prefix} and ${var.models_prefix}, write ${var.eks_runs_prefix}"
  assume_role_policy = data.aws_iam_policy_document.eks_trust[0].json
  tags               = local.tags
}

resource "aws_iam_role_policy" "eks_storage" {
  count  = var.eks_oidc_provider_arn == null ? 0 : 1
  name   = "storage"
  role   = aws_iam_role.eks[0].id
  policy = data.aws_iam_policy_document.storage["eks"].json
}
