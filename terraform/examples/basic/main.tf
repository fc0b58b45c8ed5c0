# The module applied on its own:
#
#   cd terraform/examples/basic
#   terraform init
#   terraform apply -var region=us-east-1 \
#     -var eks_oidc_provider_arn="$(aws iam list-open-id-connect-providers --query 'OpenIDConnectProviderList[0].Arn' --output text)"

terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40, < 7"
    }
  }
}

variable "region" {
  description = "AWS region for the bucket, the repository and the training jobs."
  type        = string
  default     = "us-east-1"
}

variable "eks_oidc_provider_arn" {
  description = "EKS cluster's IAM OIDC provider ARN, for the IRSA role; null skips it."
  type        = string
  default     = null
}

provider "aws" {
  region = var.region
}

module "qlora_job" {
  source = "../.."

  name                  = "qlora-job"
  eks_oidc_provider_arn = var.eks_oidc_provider_arn
  tags                  = { project = "qlora-job" }
}

output "qlora_job" {
  description = "Everything the module outputs: bucket, s3_uris, image_uri, role ARNs."
  value       = module.qlora_job
}
