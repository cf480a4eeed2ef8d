//! Key-encryption keys as the config names them: `aws-kms:<key ARN>` and
//! `azure-keyvault:https://<vault>/keys/<name>[/<version>]` (and, with the key file, env key or
//! passphrase of `[repository]`, local KEKs).

use std::fmt;

/// A key-encryption key held by a key management service, as written in `[repository] kek`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KekUri {
    /// An AWS KMS symmetric key named by its ARN (`key/<id>` or `alias/<name>`). The client's
    /// region is the ARN's: KMS keys live in one region.
    AwsKms { arn: String, region: String },
    /// A key in Azure Key Vault (or Managed HSM): the vault's URL (`https://<host>[:port]`, no
    /// trailing slash), the key's name and, when pinned, one version. Unpinned, copies are wrapped
    /// with the current version and record the version they used (`kid`).
    AzureKeyVault {
        vault: String,
        name: String,
        version: Option<String>,
    },
}

const AWS_EXAMPLE: &str = "aws-kms:arn:aws:kms:<region>:<account>:key/<id>";
const AZURE_EXAMPLE: &str = "azure-keyvault:https://<vault>.vault.azure.net/keys/<name>";

impl KekUri {
    /// Parse `aws-kms:arn:aws:kms:<region>:<account>:key/<id>` (or `:alias/<name>`; the
    /// partitions aws, aws-cn and aws-us-gov) or
    /// `azure-keyvault:https://<vault host>/keys/<name>[/<version>]`. The error says what is
    /// wrong and what to write.
    pub fn parse(text: &str) -> Result<KekUri, String> {
        let text = text.trim();
        let Some((scheme, rest)) = text.split_once(':') else {
            return Err(format!(
                "`{text}` names no key service: write {AWS_EXAMPLE} or {AZURE_EXAMPLE}"
            ));
        };
        match scheme {
            "aws-kms" => parse_arn(rest),
            "azure-keyvault" => parse_key_url(rest),
            other => Err(format!(
                "unknown key service `{other}`: write {AWS_EXAMPLE} or {AZURE_EXAMPLE}"
            )),
        }
    }

    /// The provider label used in metrics and `keys show`.
    pub fn provider(&self) -> &'static str {
        match self {
            KekUri::AwsKms { .. } => "aws-kms",
            KekUri::AzureKeyVault { .. } => "azure-keyvault",
        }
    }
}

/// `https://<host>[:port]/keys/<name>[/<version>]`, as the Azure portal shows a key identifier.
///
/// Only https: the Azure SDK sends no bearer token over plain http ("authorized requests are not
/// permitted for non-TLS protected endpoints") and its credentials refuse a non-https authority,
/// so an `http://` vault could never work, not even on a loopback address (the test fake serves
/// https on 127.0.0.1 for that reason).
fn parse_key_url(url: &str) -> Result<KekUri, String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        format!("`{url}` is not a Key Vault key URL: expected https://<vault host>/keys/<name>")
    })?;
    if scheme.eq_ignore_ascii_case("http") {
        return Err(format!(
            "`{url}`: Key Vault is reached over https only (the Azure SDK sends no token over http): write https://{rest}"
        ));
    }
    if !scheme.eq_ignore_ascii_case("https") {
        return Err(format!(
            "`{url}`: scheme `{scheme}` is not https: expected https://<vault host>/keys/<name>"
        ));
    }
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if !host_ok {
        return Err(format!("`{url}`: `{host}` is not a vault host name"));
    }
    if path.contains(['?', '#']) {
        return Err(format!(
            "`{url}`: a key URL has no query or fragment: expected https://{host}/keys/<name>[/<version>]"
        ));
    }
    let Some(key) = path.strip_prefix("keys/") else {
        return Err(format!(
            "`{url}`: the path must be /keys/<name>[/<version>] (a key, not a secret or certificate)"
        ));
    };
    let parts: Vec<&str> = key.trim_end_matches('/').split('/').collect();
    let (name, version) = match parts[..] {
        [name] => (name, None),
        [name, version] => (name, Some(version)),
        _ => {
            return Err(format!(
                "`{url}`: the path must be /keys/<name>[/<version>], nothing after the version"
            ))
        }
    };
    let valid = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !valid(name) {
        return Err(format!(
            "`{url}`: the key name must be non-empty letters, digits and dashes"
        ));
    }
    if version.is_some_and(|v| !valid(v)) {
        return Err(format!(
            "`{url}`: the key version must be letters and digits (as in the key identifier)"
        ));
    }
    Ok(KekUri::AzureKeyVault {
        vault: format!("https://{host}"),
        name: name.to_string(),
        version: version.map(str::to_string),
    })
}

fn parse_arn(arn: &str) -> Result<KekUri, String> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [prefix, partition, service, region, account, resource] = parts[..] else {
        return Err(format!(
            "`{arn}` is not a KMS key ARN: expected arn:aws:kms:<region>:<account>:key/<id>"
        ));
    };
    if prefix != "arn" || !matches!(partition, "aws" | "aws-cn" | "aws-us-gov") {
        return Err(format!(
            "`{arn}` is not an AWS ARN (it must start with arn:aws:, arn:aws-cn: or arn:aws-us-gov:)"
        ));
    }
    if service != "kms" {
        return Err(format!("`{arn}` names service `{service}`, not kms"));
    }
    let region_ok = !region.is_empty()
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !region_ok {
        return Err(format!("`{arn}`: `{region}` is not an AWS region"));
    }
    if account.len() != 12 || !account.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "`{arn}`: `{account}` is not a 12-digit AWS account"
        ));
    }
    let named = resource
        .strip_prefix("key/")
        .or_else(|| resource.strip_prefix("alias/"))
        .is_some_and(|name| !name.is_empty() && !name.contains(char::is_whitespace));
    if !named {
        return Err(format!(
            "`{arn}`: the resource must be key/<key id> or alias/<name>"
        ));
    }
    Ok(KekUri::AwsKms {
        arn: arn.to_string(),
        region: region.to_string(),
    })
}

impl fmt::Display for KekUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KekUri::AwsKms { arn, .. } => write!(f, "aws-kms:{arn}"),
            KekUri::AzureKeyVault {
                vault,
                name,
                version,
            } => {
                write!(f, "azure-keyvault:{vault}/keys/{name}")?;
                match version {
                    Some(v) => write!(f, "/{v}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// What a key service says about a KEK. Only `Enabled` may wrap or unwrap: a disabled key or
/// one pending deletion is refused even where the service would still decrypt with it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KekState {
    Enabled,
    /// A state that refuses use, as the service names it (`Disabled`, `PendingDeletion`, ...).
    Refused(String),
    /// The key does not exist (or this identity may not see it).
    NotFound,
    /// The service could not be asked (network, credentials); the reason.
    Unreachable(String),
    /// A key file, env key or passphrase: no service to ask.
    Local,
}

impl fmt::Display for KekState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KekState::Enabled => f.write_str("Enabled"),
            KekState::Refused(state) => f.write_str(state),
            KekState::NotFound => f.write_str("NotFound"),
            KekState::Unreachable(why) => write!(f, "unreachable ({why})"),
            KekState::Local => f.write_str("local"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    #[test]
    fn an_arn_parses_with_its_region() {
        let kek = KekUri::parse(&format!("aws-kms:{ARN}")).unwrap();
        assert_eq!(
            kek,
            KekUri::AwsKms {
                arn: ARN.into(),
                region: "eu-west-1".into()
            }
        );
        assert_eq!(kek.to_string(), format!("aws-kms:{ARN}"));
        let alias = KekUri::parse("aws-kms:arn:aws:kms:us-east-1:123456789012:alias/backup");
        assert!(alias.is_ok());
    }

    #[test]
    fn typos_are_named() {
        let cases = [
            (
                "kms:arn:aws:kms:eu-west-1:123456789012:key/x",
                "unknown key service `kms`",
            ),
            ("aws-kms:arn:aws:s3:eu-west-1:123456789012:key/x", "not kms"),
            ("aws-kms:arn:aws:kms:eu-west-1:1234:key/x", "12-digit"),
            (
                "aws-kms:arn:aws:kms:EU:123456789012:key/x",
                "not an AWS region",
            ),
            (
                "aws-kms:arn:aws:kms:eu-west-1:123456789012:keys/x",
                "key/<key id>",
            ),
            ("aws-kms:1234abcd-12ab", "not a KMS key ARN"),
            (
                "arn:aws:kms:eu-west-1:123456789012:key/x",
                "unknown key service `arn`",
            ),
            ("v.vault.azure.net/keys/k", "names no key service"),
        ];
        for (text, expected) in cases {
            let err = KekUri::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn a_key_vault_url_parses_with_and_without_a_version() {
        let text = "azure-keyvault:https://myvault.vault.azure.net/keys/backup-kek";
        let kek = KekUri::parse(text).unwrap();
        assert_eq!(
            kek,
            KekUri::AzureKeyVault {
                vault: "https://myvault.vault.azure.net".into(),
                name: "backup-kek".into(),
                version: None,
            }
        );
        assert_eq!(kek.to_string(), text);
        assert_eq!(kek.provider(), "azure-keyvault");

        let pinned = "azure-keyvault:https://127.0.0.1:8443/keys/k1/0123abcdef";
        let kek = KekUri::parse(pinned).unwrap();
        assert_eq!(
            kek,
            KekUri::AzureKeyVault {
                vault: "https://127.0.0.1:8443".into(),
                name: "k1".into(),
                version: Some("0123abcdef".into()),
            }
        );
        assert_eq!(kek.to_string(), pinned);
        // A trailing slash (as some tools copy it) names the same key.
        assert_eq!(
            KekUri::parse("azure-keyvault:https://myvault.vault.azure.net/keys/backup-kek/")
                .unwrap()
                .to_string(),
            text
        );
    }

    #[test]
    fn key_vault_typos_are_named() {
        let cases = [
            (
                "azure-keyvault:http://myvault.vault.azure.net/keys/k",
                "https only",
            ),
            ("azure-keyvault:http://127.0.0.1:8443/keys/k", "https only"),
            (
                "azure-keyvault:myvault.vault.azure.net/keys/k",
                "not a Key Vault key URL",
            ),
            (
                "azure-keyvault:ftp://myvault.vault.azure.net/keys/k",
                "not https",
            ),
            (
                "azure-keyvault:https://myvault.vault.azure.net/k",
                "/keys/<name>",
            ),
            (
                "azure-keyvault:https://myvault.vault.azure.net/secrets/k",
                "not a secret",
            ),
            (
                "azure-keyvault:https://myvault.vault.azure.net/keys/",
                "key name must be non-empty",
            ),
            (
                "azure-keyvault:https://myvault.vault.azure.net/keys//v1",
                "key name must be non-empty",
            ),
            (
                "azure-keyvault:https://myvault.vault.azure.net/keys/k/v1/wrapkey",
                "nothing after the version",
            ),
            (
                "azure-keyvault:https://myvault.vault.azure.net/keys/k?api-version=7.4",
                "no query",
            ),
            ("azure-keyvault:https:///keys/k", "not a vault host"),
            (
                "azure-keyvault:https://my_vault.vault.azure.net/keys/k",
                "not a vault host",
            ),
        ];
        for (text, expected) in cases {
            let err = KekUri::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
