//! Azure Key Vault (or Managed HSM) as a key-encryption key, through the Azure SDK
//! (`azure_security_keyvault_keys`, `azure_identity`).
//!
//! The repository data key is wrapped with `wrapKey` and unwrapped with `unwrapKey`: RSA-OAEP-256
//! for RSA keys, A256KW for symmetric (`oct`, `oct-HSM`) keys. A copy records the key identifier
//! (`kid`, with its version) that wrapped it, and is unwrapped with that same version: a key
//! rotated in the vault keeps opening older copies while that version is enabled.
//!
//! Key Vault has no encryption context (AWS KMS binds each copy to the repository with one). The
//! binding here is the copy's own record: its MAC under the data key it wraps covers the
//! repository id, the KEK and the `kid`, and `Kek::unwrap` refuses a copy of another repository
//! before any call. So a copy moved between repositories, or edited, is still found out.
//!
//! Before either operation `GetKey` must show the key enabled and not expired: timevault refuses
//! a key an operator disabled even where the service would still answer.
//!
//! Credentials, in this order:
//! 1. `AZURE_TENANT_ID`, `AZURE_CLIENT_ID` and `AZURE_CLIENT_SECRET`: a service principal with a
//!    client secret, from the authority `AZURE_AUTHORITY_HOST` (default
//!    `https://login.microsoftonline.com`; `azure_identity` reads that variable itself);
//! 2. `AZURE_FEDERATED_TOKEN_FILE` (with `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`): workload identity,
//!    as AKS injects it;
//! 3. otherwise the managed identity of the VM, App Service or container (user-assigned when
//!    `AZURE_CLIENT_ID` is set).

use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions, StatusCode};
use azure_core::time::{Duration, OffsetDateTime};
use azure_identity::{
    ClientSecretCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId, WorkloadIdentityCredential,
};
use azure_security_keyvault_keys::models::{
    EncryptionAlgorithm, Key, KeyClientGetKeyOptions, KeyClientWrapKeyOptions,
    KeyOperationParameters, KeyType,
};
use azure_security_keyvault_keys::{KeyClient, KeyClientOptions, ResourceId};
use zeroize::Zeroizing;

use super::kek::KekState;
use super::telemetry::timed;
use super::wrapped::Algorithm;
use crate::error::{Error, ErrorKind, Result};

const PROVIDER: &str = "azure-keyvault";
const HINT: &str = "check the key in the vault (enabled, not expired, `timevault keys show`), that the identity may get, wrapKey and unwrapKey it (RBAC role Key Vault Crypto User, or an access policy), and the AZURE_TENANT_ID / AZURE_CLIENT_ID / AZURE_CLIENT_SECRET (or managed identity) environment";

/// A copy wrapped by Key Vault: the wrapped bytes, how, and the key version that did it.
pub struct Wrapped {
    pub bytes: Vec<u8>,
    pub algorithm: Algorithm,
    pub kid: String,
}

/// One Key Vault key and a client for its vault.
pub struct AzureKek {
    vault: String,
    name: String,
    version: Option<String>,
    label: String,
    /// The client, or why none could be made (bad credential variables): reported on first use.
    client: std::result::Result<KeyClient, String>,
}

impl AzureKek {
    /// A client for `vault` (no request is sent yet).
    pub fn connect(vault: &str, name: &str, version: Option<&str>, label: &str) -> AzureKek {
        AzureKek {
            vault: vault.to_string(),
            name: name.to_string(),
            version: version.map(str::to_string),
            label: label.to_string(),
            client: client(vault).map_err(|e| format!("azure credentials: {e}")),
        }
    }

    /// `GetKey`: enabled, not expired, not before its start, a key type that wraps.
    pub async fn state(&self) -> KekState {
        match self.get().await {
            Ok(key) => usable_state(&key, OffsetDateTime::now_utc()),
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => KekState::NotFound,
            Err(e) => KekState::Unreachable(describe(&e)),
        }
    }

    /// `wrapKey` with the key's current (or pinned) version and the algorithm its type takes.
    pub async fn wrap(&self, data_key: &[u8; 32]) -> Result<Wrapped> {
        let key = self.get().await.map_err(|e| self.failed("GetKey", &e))?;
        let jwk = key.key.as_ref();
        let (algorithm, alg) =
            algorithm_for(jwk.and_then(|k| k.kty.as_ref())).ok_or_else(|| {
                self.refused(format!(
                    "key type {:?} cannot wrap keys",
                    jwk.and_then(|k| k.kty.clone())
                ))
            })?;
        let version = jwk
            .and_then(|k| k.kid.as_deref())
            .and_then(|kid| kid.parse::<ResourceId>().ok())
            .and_then(|id| id.version)
            .ok_or_else(|| self.refused("GetKey returned no key version (kid)".into()))?;
        let params = KeyOperationParameters {
            algorithm: Some(alg),
            value: Some(data_key.to_vec()),
            ..Default::default()
        };
        let client = self.client()?;
        let call = async {
            let options = KeyClientWrapKeyOptions {
                key_version: Some(version.clone()),
                ..Default::default()
            };
            client
                .wrap_key(&self.name, params.try_into()?, Some(options))
                .await?
                .into_model()
        };
        let out = timed(PROVIDER, &self.label, "WrapKey", call)
            .await
            .map_err(|e| self.failed("WrapKey", &e))?;
        let bytes = out
            .result
            .ok_or_else(|| self.refused("WrapKey returned no value".into()))?;
        let kid = out
            .kid
            .unwrap_or_else(|| format!("{}/keys/{}/{version}", self.vault, self.name));
        self.version_of(&kid)?;
        Ok(Wrapped {
            bytes,
            algorithm,
            kid,
        })
    }

    /// `unwrapKey` with the version (`kid`) and algorithm the copy records; the plaintext is
    /// wiped when dropped.
    pub async fn unwrap(
        &self,
        kid: &str,
        algorithm: Algorithm,
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let version = self.version_of(kid)?;
        let alg = match algorithm {
            Algorithm::RsaOaep256 => EncryptionAlgorithm::RsaOaep256,
            Algorithm::A256Kw => EncryptionAlgorithm::A256Kw,
            other => {
                return Err(Error::corrupt(format!(
                    "{}: algorithm {other:?} is not a Key Vault wrap algorithm",
                    self.label
                )))
            }
        };
        let params = KeyOperationParameters {
            algorithm: Some(alg),
            value: Some(wrapped.to_vec()),
            ..Default::default()
        };
        let client = self.client()?;
        let call = async {
            client
                .unwrap_key(&self.name, &version, params.try_into()?, None)
                .await?
                .into_model()
        };
        let out = timed(PROVIDER, &self.label, "UnwrapKey", call)
            .await
            .map_err(|e| self.failed("UnwrapKey", &e))?;
        out.result
            .map(Zeroizing::new)
            .ok_or_else(|| self.refused("UnwrapKey returned no value".into()))
    }

    /// `DeleteKey`: the key, every version, is deleted. With soft delete the vault keeps it
    /// recoverable until the purge date it answers with; what the vault said.
    pub async fn delete(&self) -> Result<String> {
        let client = self.client()?;
        let call = async { client.delete_key(&self.name, None).await?.into_model() };
        let out = timed(PROVIDER, &self.label, "DeleteKey", call)
            .await
            .map_err(|e| self.failed("DeleteKey", &e))?;
        let purge = out
            .scheduled_purge_date
            .and_then(|date| chrono::DateTime::from_timestamp(date.unix_timestamp(), 0));
        Ok(match purge {
            Some(date) => format!(
                "deleted; purge scheduled for {} (soft delete: recoverable in the vault until then)",
                date.format("%Y-%m-%d %H:%M:%S UTC")
            ),
            None => "deleted (the vault keeps no recoverable copy)".into(),
        })
    }

    async fn get(&self) -> azure_core::Result<Key> {
        let client = self.client.as_ref().map_err(|e| {
            azure_core::Error::with_message(azure_core::error::ErrorKind::Credential, e.clone())
        })?;
        let call = async {
            let options = KeyClientGetKeyOptions {
                key_version: self.version.clone(),
                ..Default::default()
            };
            client
                .get_key(&self.name, Some(options))
                .await?
                .into_model()
        };
        timed(PROVIDER, &self.label, "GetKey", call).await
    }

    fn client(&self) -> Result<&KeyClient> {
        self.client
            .as_ref()
            .map_err(|e| Error::new(ErrorKind::Key, format!("{}: {e}", self.label)).with_hint(HINT))
    }

    /// The version a key identifier names, which must be of this vault's key.
    fn version_of(&self, kid: &str) -> Result<String> {
        let foreign = || {
            Error::corrupt(format!(
                "{}: the copy names key {kid}, not a version of this key",
                self.label
            ))
        };
        let id: ResourceId = kid.parse().map_err(|_| foreign())?;
        let ours: ResourceId = format!("{}/keys/{}", self.vault, self.name)
            .parse()
            .map_err(|_| foreign())?;
        match id.version {
            Some(version) if id.vault_url == ours.vault_url && id.name == self.name => Ok(version),
            _ => Err(foreign()),
        }
    }

    fn refused(&self, why: String) -> Error {
        Error::new(ErrorKind::Key, format!("{}: {why}", self.label)).with_hint(HINT)
    }

    /// Authentication, authorization and the key's own refusals are key errors; a vault that
    /// cannot be reached (connection, I/O, throttling, 5xx after the SDK's retries) is
    /// unavailable.
    fn failed(&self, operation: &str, e: &azure_core::Error) -> Error {
        use azure_core::error::ErrorKind as Az;
        let kind = match e.kind() {
            Az::Connection | Az::Io => ErrorKind::Unavailable,
            Az::HttpResponse { status, .. }
                if *status == StatusCode::TooManyRequests || status.is_server_error() =>
            {
                ErrorKind::Unavailable
            }
            _ => ErrorKind::Key,
        };
        Error::new(
            kind,
            format!("{}: {operation}: {}", self.label, describe(e)),
        )
        .with_hint(HINT)
    }
}

/// An SDK error with its causes: the SDK's outer message alone ("non-transport error occurred
/// which will not be retried") hides the one that matters (Entra's "Invalid client secret").
fn describe(e: &azure_core::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    // Entra appends a troubleshooting link on its own line; keep messages on one line.
    parts.join(": ").replace('\n', " ")
}

/// A client with the credential the environment names (see the module docs). The SDK checks
/// that a vault's authentication challenge names a resource its host belongs to
/// (`*.vault.azure.net`); a vault on a loopback address (a test server) cannot pass that check,
/// so it is skipped there and only there.
fn client(vault: &str) -> azure_core::Result<KeyClient> {
    let retry = RetryOptions::exponential(ExponentialRetryOptions {
        max_retries: 3,
        max_total_elapsed: Duration::seconds(20),
        ..Default::default()
    });
    let client_options = || ClientOptions {
        retry: retry.clone(),
        ..Default::default()
    };
    let credential = credential(client_options())?;
    let options = KeyClientOptions {
        client_options: client_options(),
        verify_challenge_resource: Some(!is_loopback(vault)),
        ..Default::default()
    };
    KeyClient::new(vault, credential, Some(options))
}

fn credential(client_options: ClientOptions) -> azure_core::Result<Arc<dyn TokenCredential>> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (tenant, client_id, secret) = (
        var("AZURE_TENANT_ID"),
        var("AZURE_CLIENT_ID"),
        var("AZURE_CLIENT_SECRET"),
    );
    if let Some(secret) = secret {
        let (Some(tenant), Some(client_id)) = (tenant, client_id) else {
            return Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                "AZURE_CLIENT_SECRET is set but AZURE_TENANT_ID or AZURE_CLIENT_ID is not",
            ));
        };
        let options = azure_identity::ClientSecretCredentialOptions { client_options };
        return Ok(ClientSecretCredential::new(
            &tenant,
            client_id,
            secret.into(),
            Some(options),
        )?);
    }
    if var("AZURE_FEDERATED_TOKEN_FILE").is_some() {
        let mut options = azure_identity::WorkloadIdentityCredentialOptions::default();
        options.credential_options.client_options = client_options;
        return Ok(WorkloadIdentityCredential::new(Some(options))?);
    }
    let options = ManagedIdentityCredentialOptions {
        user_assigned_id: client_id.map(UserAssignedId::ClientId),
        client_options,
    };
    Ok(ManagedIdentityCredential::new(Some(options))?)
}

fn is_loopback(vault: &str) -> bool {
    url::Url::parse(vault)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .is_some_and(|host| matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]"))
}

/// Which of our algorithms (and the SDK's) a key type wraps with.
fn algorithm_for(kty: Option<&KeyType>) -> Option<(Algorithm, EncryptionAlgorithm)> {
    match kty? {
        KeyType::Rsa | KeyType::RsaHsm => {
            Some((Algorithm::RsaOaep256, EncryptionAlgorithm::RsaOaep256))
        }
        KeyType::Oct | KeyType::OctHsm => Some((Algorithm::A256Kw, EncryptionAlgorithm::A256Kw)),
        _ => None,
    }
}

/// The state a `GetKey` answer gives at `now`.
fn usable_state(key: &Key, now: OffsetDateTime) -> KekState {
    let attributes = key.attributes.as_ref();
    if attributes.and_then(|a| a.enabled) == Some(false) {
        return KekState::Refused("Disabled".into());
    }
    if attributes
        .and_then(|a| a.expires)
        .is_some_and(|exp| exp <= now)
    {
        return KekState::Refused("Expired".into());
    }
    if attributes
        .and_then(|a| a.not_before)
        .is_some_and(|nbf| nbf > now)
    {
        return KekState::Refused("NotYetValid".into());
    }
    let jwk = key.key.as_ref();
    if algorithm_for(jwk.and_then(|k| k.kty.as_ref())).is_none() {
        let kty = jwk
            .and_then(|k| k.kty.as_ref())
            .map_or("none".to_string(), |k| k.to_string());
        return KekState::Refused(format!("KeyType {kty} cannot wrap"));
    }
    let ops = jwk.and_then(|k| k.key_ops.as_ref());
    if ops.is_some_and(|ops| {
        !ops.iter().any(|o| o == "wrapKey") || !ops.iter().any(|o| o == "unwrapKey")
    }) {
        return KekState::Refused("WrapKeyNotPermitted".into());
    }
    KekState::Enabled
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(json: serde_json::Value) -> Key {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn the_state_refuses_disabled_expired_and_unwrapping_keys() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let rsa = |attributes: serde_json::Value| {
            key(serde_json::json!({
                "key": {"kid": "https://v.vault.azure.net/keys/k/1", "kty": "RSA", "key_ops": ["wrapKey", "unwrapKey"]},
                "attributes": attributes,
            }))
        };
        assert_eq!(
            usable_state(&rsa(serde_json::json!({"enabled": true})), now),
            KekState::Enabled
        );
        assert_eq!(
            usable_state(&rsa(serde_json::json!({"enabled": false})), now),
            KekState::Refused("Disabled".into())
        );
        assert_eq!(
            usable_state(
                &rsa(serde_json::json!({"enabled": true, "exp": 1_700_000_000})),
                now
            ),
            KekState::Refused("Expired".into())
        );
        assert_eq!(
            usable_state(
                &rsa(serde_json::json!({"enabled": true, "exp": 1_900_000_000})),
                now
            ),
            KekState::Enabled
        );
        assert_eq!(
            usable_state(
                &rsa(serde_json::json!({"enabled": true, "nbf": 1_900_000_000})),
                now
            ),
            KekState::Refused("NotYetValid".into())
        );
        let ec = key(
            serde_json::json!({"key": {"kid": "https://v.vault.azure.net/keys/k/1", "kty": "EC"}, "attributes": {"enabled": true}}),
        );
        assert_eq!(
            usable_state(&ec, now),
            KekState::Refused("KeyType EC cannot wrap".into())
        );
        let sign_only = key(
            serde_json::json!({"key": {"kty": "RSA", "key_ops": ["sign", "verify"]}, "attributes": {"enabled": true}}),
        );
        assert_eq!(
            usable_state(&sign_only, now),
            KekState::Refused("WrapKeyNotPermitted".into())
        );
    }

    #[test]
    fn the_algorithm_follows_the_key_type() {
        assert_eq!(
            algorithm_for(Some(&KeyType::RsaHsm)).unwrap().0,
            Algorithm::RsaOaep256
        );
        assert_eq!(
            algorithm_for(Some(&KeyType::Oct)).unwrap().0,
            Algorithm::A256Kw
        );
        assert!(algorithm_for(Some(&KeyType::Ec)).is_none());
        assert!(algorithm_for(None).is_none());
    }

    #[test]
    fn only_a_version_of_this_key_unwraps() {
        let kek = AzureKek {
            vault: "https://MyVault.vault.azure.net".into(),
            name: "k".into(),
            version: None,
            label: "azure-keyvault:https://MyVault.vault.azure.net/keys/k".into(),
            client: Err("unused".into()),
        };
        assert_eq!(
            kek.version_of("https://myvault.vault.azure.net/keys/k/abc123")
                .unwrap(),
            "abc123"
        );
        for foreign in [
            "https://other.vault.azure.net/keys/k/abc123",
            "https://myvault.vault.azure.net/keys/k2/abc123",
            "https://myvault.vault.azure.net/keys/k",
            "not a url",
        ] {
            assert_eq!(
                kek.version_of(foreign).unwrap_err().kind(),
                ErrorKind::Corrupt,
                "{foreign}"
            );
        }
        assert!(is_loopback("https://127.0.0.1:8443"));
        assert!(is_loopback("https://localhost"));
        assert!(!is_loopback("https://myvault.vault.azure.net"));
        assert!(!is_loopback("https://127.0.0.1.evil.example:443"));
    }
}
