//! AWS KMS as a key-encryption key, through the AWS SDK (credentials, endpoint and retries from
//! the SDK's standard environment: `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, profiles, ...).
//!
//! The repository data key is wrapped with `Encrypt` and unwrapped with `Decrypt`, both bound to
//! the encryption context `timevault:repository = <repository id>`, so a wrapped copy moved to
//! another repository does not decrypt. Before either, `DescribeKey` must say `Enabled`: a test
//! server (and a key being retired) may still decrypt with a key an operator disabled.

use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::KeyState;
use aws_sdk_kms::Client;
use zeroize::Zeroizing;

use super::kek::KekState;
use super::telemetry::timed;
use crate::error::{Error, ErrorKind, Result};

const PROVIDER: &str = "aws-kms";
const CONTEXT_KEY: &str = "timevault:repository";

/// One KMS key and a client in its region.
pub struct AwsKek {
    arn: String,
    label: String,
    client: Client,
}

impl AwsKek {
    pub async fn connect(arn: &str, region: &str, label: &str) -> AwsKek {
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .load()
            .await;
        AwsKek {
            arn: arn.to_string(),
            label: label.to_string(),
            client: Client::new(&config),
        }
    }

    /// `DescribeKey`'s `KeyState`.
    pub async fn state(&self) -> KekState {
        let call = self.client.describe_key().key_id(&self.arn).send();
        match timed(PROVIDER, &self.label, "DescribeKey", call).await {
            Ok(out) => match out.key_metadata().and_then(|m| m.key_state()) {
                Some(KeyState::Enabled) => KekState::Enabled,
                Some(state) => KekState::Refused(state.as_str().to_string()),
                None => KekState::Unreachable("DescribeKey returned no key state".into()),
            },
            Err(e) if e.code() == Some("NotFoundException") => KekState::NotFound,
            Err(e) => KekState::Unreachable(DisplayErrorContext(&e).to_string()),
        }
    }

    /// Encrypt the data key under this KMS key, bound to `repository_id`.
    pub async fn wrap(&self, repository_id: &str, data_key: &[u8; 32]) -> Result<Vec<u8>> {
        let call = self
            .client
            .encrypt()
            .key_id(&self.arn)
            .plaintext(Blob::new(data_key.to_vec()))
            .encryption_context(CONTEXT_KEY, repository_id)
            .send();
        let out = timed(PROVIDER, &self.label, "Encrypt", call)
            .await
            .map_err(|e| self.failed("Encrypt", &e))?;
        out.ciphertext_blob()
            .map(|b| b.as_ref().to_vec())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Key,
                    format!("{}: Encrypt returned no ciphertext", self.label),
                )
            })
    }

    /// `ScheduleKeyDeletion` after `days` (7 to 30, KMS's window); the date it will be deleted.
    pub async fn schedule_deletion(&self, days: i32) -> Result<String> {
        // The key id rather than the ARN: KMS takes either, moto only the id.
        let key_id = self
            .arn
            .rsplit_once(":key/")
            .map_or(self.arn.as_str(), |(_, id)| id);
        let call = self
            .client
            .schedule_key_deletion()
            .key_id(key_id)
            .pending_window_in_days(days)
            .send();
        let out = timed(PROVIDER, &self.label, "ScheduleKeyDeletion", call)
            .await
            .map_err(|e| self.failed("ScheduleKeyDeletion", &e))?;
        Ok(out
            .deletion_date()
            .map_or_else(|| format!("in {days} days"), |d| d.to_string()))
    }

    /// Decrypt a wrapped data key; the plaintext is wiped when dropped.
    pub async fn unwrap(&self, repository_id: &str, wrapped: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let call = self
            .client
            .decrypt()
            .key_id(&self.arn)
            .ciphertext_blob(Blob::new(wrapped.to_vec()))
            .encryption_context(CONTEXT_KEY, repository_id)
            .send();
        let out = timed(PROVIDER, &self.label, "Decrypt", call)
            .await
            .map_err(|e| self.failed("Decrypt", &e))?;
        out.plaintext()
            .map(|b| Zeroizing::new(b.as_ref().to_vec()))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Key,
                    format!("{}: Decrypt returned no plaintext", self.label),
                )
            })
    }

    fn failed<E>(&self, operation: &str, e: &aws_sdk_kms::error::SdkError<E>) -> Error
    where
        E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    {
        let kind = match e.code() {
            Some(
                "AccessDeniedException"
                | "InvalidCiphertextException"
                | "IncorrectKeyException"
                | "DisabledException"
                | "KMSInvalidStateException"
                | "NotFoundException",
            ) => ErrorKind::Key,
            _ => ErrorKind::Unavailable,
        };
        Error::new(
            kind,
            format!("{}: {operation}: {}", self.label, DisplayErrorContext(e)),
        )
        .with_hint("check the key's state and policy (`timevault keys show`), and the AWS credentials, region and endpoint in the environment")
    }
}
