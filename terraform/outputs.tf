output "bucket" {
  description = "Name of the bucket for data, models and runs."
  value       = aws_s3_bucket.this.bucket
}

output "bucket_arn" {
  description = "ARN of the bucket."
  value       = aws_s3_bucket.this.arn
}

output "kms_key_arn" {
  description = "KMS key that encrypts the bucket and the repository."
  value       = aws_kms_key.this.arn
}

output "s3_uris" {
  description = "Where things go: upload the CSVs and base models to data and models; runs write under their platform's prefix."
  value = {
    data           = "s3://${aws_s3_bucket.this.bucket}/${var.data_prefix}"
    models         = "s3://${aws_s3_bucket.this.bucket}/${var.models_prefix}"
    sagemaker_runs = "s3://${aws_s3_bucket.this.bucket}/${var.sagemaker_runs_prefix}"
    eks_runs       = "s3://${aws_s3_bucket.this.bucket}/${var.eks_runs_prefix}"
  }
}

output "ecr_repository_url" {
  description = "ECR repository to push the image to."
  value       = aws_ecr_repository.this.repository_url
}

output "image_uri" {
  description = "The image at var.image_tag: the SageMaker estimator's image_uri, and kustomize's images newName:newTag."
  value       = "${aws_ecr_repository.this.repository_url}:${var.image_tag}"
}

output "sagemaker_role_arn" {
  description = "Role for SageMaker training jobs (the estimator's role). Null when create_sagemaker_role is false."
  value       = one(aws_iam_role.sagemaker[*].arn)
}

output "eks_role_arn" {
  description = "Role for the Kubernetes ServiceAccount (annotation eks.amazonaws.com/role-arn). Null without eks_oidc_provider_arn."
  value       = one(aws_iam_role.eks[*].arn)
}
