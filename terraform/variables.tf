variable "name" {
  description = "Name prefix for every resource (ECR repository, IAM roles, KMS alias)."
  type        = string
  default     = "qlora-job"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{1,38}[a-z0-9]$", var.name))
    error_message = "name: 3-40 characters, lowercase letters, digits and hyphens."
  }
}

variable "bucket_name" {
  description = "S3 bucket for data, models and runs. Null: \"<name>-<account id>-<region>\" (bucket names are global)."
  type        = string
  default     = null
}

variable "image_tag" {
  description = "Image tag that the image_uri output points at (tags are immutable: push a new tag per release)."
  type        = string
  default     = "0.1.0"
}

variable "data_prefix" {
  description = "Bucket prefix of the training CSVs; both roles may only read it."
  type        = string
  default     = "data/"
}

variable "models_prefix" {
  description = "Bucket prefix of the base models (Hugging Face model folders); both roles may only read it."
  type        = string
  default     = "models/"
}

variable "sagemaker_runs_prefix" {
  description = "Bucket prefix where SageMaker jobs write: checkpoint_s3_uri (the run folder, synced from /opt/ml/checkpoints) and output_path (model.tar.gz). Only the SageMaker role may write here."
  type        = string
  default     = "runs/sagemaker/"
}

variable "eks_runs_prefix" {
  description = "Bucket prefix of the runs started on Kubernetes (run_uri = s3://<bucket>/<prefix><run>). Only the EKS role may write here."
  type        = string
  default     = "runs/eks/"
}

variable "checkpoint_retention_days" {
  description = "Days a replaced or deleted object version under runs/ is kept. The job deletes checkpoints beyond train.keep_checkpoints as it trains; in this versioned bucket each deletion leaves a noncurrent version (hundreds of MB for a 7B adapter with optimizer state), which this rule expires."
  type        = number
  default     = 7

  validation {
    condition     = var.checkpoint_retention_days >= 1
    error_message = "checkpoint_retention_days must be at least 1."
  }
}

variable "run_expiration_days" {
  description = "Days after which whole runs under runs/ (checkpoints, merged models, reports) expire. Null keeps finished runs until you delete them."
  type        = number
  default     = null
}

variable "create_sagemaker_role" {
  description = "Create the IAM role that SageMaker training jobs assume (output sagemaker_role_arn)."
  type        = bool
  default     = true
}

variable "eks_oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider (arn:aws:iam::<account>:oidc-provider/oidc.eks.<region>.amazonaws.com/id/<id>). Null: no IRSA role."
  type        = string
  default     = null
}

variable "k8s_namespace" {
  description = "Namespace of the Kubernetes ServiceAccount allowed to assume the IRSA role (k8s/base uses qlora-job)."
  type        = string
  default     = "qlora-job"
}

variable "k8s_service_account" {
  description = "Name of the Kubernetes ServiceAccount allowed to assume the IRSA role (k8s/base uses qlora-job)."
  type        = string
  default     = "qlora-job"
}

variable "force_destroy" {
  description = "Allow terraform destroy to delete the bucket and repository with their contents (for throwaway environments only)."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
