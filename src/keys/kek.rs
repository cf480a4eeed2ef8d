//! Key-encryption keys as the config names them: `aws-kms:<key ARN>` (and, with the key file,
//! env key or passphrase of `[repository]`, local KEKs).

use std::fmt;

/// A key-encryption key held by a key management service, as written in `[repository] kek`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KekUri {
    /// An AWS KMS symmetric key named by its ARN (`key/<id>` or `alias/<name>`). The client's
    /// region is the ARN's: KMS keys live in one region.
    AwsKms { arn: String, region: String },
}

impl KekUri {
    /// Parse `aws-kms:arn:aws:kms:<region>:<account>:key/<id>` (or `:alias/<name>`; the
    /// partitions aws, aws-cn and aws-us-gov). The error says what is wrong and what to write.
    pub fn parse(text: &str) -> Result<KekUri, String> {
        let text = text.trim();
        let Some((scheme, rest)) = text.split_once(':') else {
            return Err(format!(
                "`{text}` names no key service: write aws-kms:arn:aws:kms:<region>:<account>:key/<id>"
            ));
        };
        match scheme {
            "aws-kms" => parse_arn(rest),
            "azure-keyvault" => Err(
                "azure-keyvault KEKs are not supported by this timevault yet; use aws-kms:<key ARN>, \
                 or key_file / key_env / passphrase_env"
                    .into(),
            ),
            other => Err(format!(
                "unknown key service `{other}`: write aws-kms:arn:aws:kms:<region>:<account>:key/<id>"
            )),
        }
    }

    /// The provider label used in metrics and `keys show`.
    pub fn provider(&self) -> &'static str {
        match self {
            KekUri::AwsKms { .. } => "aws-kms",
        }
    }
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
            (
                "azure-keyvault:https://v.vault.azure.net/keys/k",
                "not supported",
            ),
        ];
        for (text, expected) in cases {
            let err = KekUri::parse(text).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
