//! The volume API microversion (`OpenStack-API-Version: volume X.Y`).
//!
//! Cinder's rules: a missing header means the oldest version, `latest` means the newest, a
//! string that is not `major.minor` is a bad request (400), and a well-formed version outside
//! the supported range is not acceptable (406). Handlers then compare the version against the
//! version that introduced them; an action that is too new answers a bare 404.

use std::fmt;

use hyper::header::HeaderMap;

use crate::error::{Error, ErrorKind, Result};

/// The header that carries the requested microversion, and that responses echo.
pub const HEADER: &str = "openstack-api-version";

/// The service name the volume API answers to inside [`HEADER`].
const SERVICE: &str = "volume";

/// A volume API microversion.
#[derive(Clone, Copy, Debug, Eq, PartialEq, Ord, PartialOrd)]
pub struct ApiVersion {
    major: u32,
    minor: u32,
}

impl ApiVersion {
    /// The oldest version served; also what a request without the header gets.
    pub const MIN: Self = Self::new(3, 0);
    /// The newest version served; what `latest` stands for.
    pub const MAX: Self = Self::new(3, 71);
    /// The `/attachments` API.
    pub const ATTACHMENTS: Self = Self::new(3, 27);
    /// The attachment `os-complete` action.
    pub const ATTACHMENT_COMPLETE: Self = Self::new(3, 44);
    /// The volume `os-reimage` action.
    pub const REIMAGE: Self = Self::new(3, 68);

    /// The version `major.minor`.
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// The version a request asks for through its headers.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self> {
        // Several header lines are one comma-separated list (RFC 9110), each entry naming a
        // service; only ours matters.
        for line in headers.get_all(HEADER) {
            let line = line
                .to_str()
                .map_err(|_| Error::invalid("The OpenStack-API-Version header is not ASCII."))?;
            for entry in line.split(',') {
                let mut words = entry.split_whitespace();
                let service = words.next().unwrap_or_default();
                if !service.eq_ignore_ascii_case(SERVICE) {
                    continue;
                }
                let version = words.collect::<Vec<_>>().join(" ");
                return Self::parse(&version);
            }
        }
        Ok(Self::MIN)
    }

    /// Parses the version part of the header: `latest` or `major.minor` in range.
    pub fn parse(text: &str) -> Result<Self> {
        if text == "latest" {
            return Ok(Self::MAX);
        }

        let malformed = || {
            Error::invalid(format!(
                "API version {text:?} is malformed; use MAJOR.MINOR, for example 3.68, or latest."
            ))
        };
        let (major, minor) = text.split_once('.').ok_or_else(malformed)?;
        if !is_version_number(major) || !is_version_number(minor) || major == "0" {
            return Err(malformed());
        }

        // Digits only, so a failed parse can only be an overflow: far out of range.
        let version = match (major.parse(), minor.parse()) {
            (Ok(major), Ok(minor)) => Some(Self::new(major, minor)),
            _ => None,
        };
        match version {
            Some(version) if (Self::MIN..=Self::MAX).contains(&version) => Ok(version),
            _ => Err(Error::new(
                ErrorKind::NotAcceptable,
                format!(
                    "API version {text} is not supported; this service accepts {} to {}.",
                    Self::MIN,
                    Self::MAX
                ),
            )),
        }
    }

    /// Whether this version has a feature introduced in `since`.
    pub fn has(self, since: Self) -> bool {
        self >= since
    }

    /// The header value that echoes this version (`volume 3.68`).
    pub fn header_value(self) -> String {
        format!("{SERVICE} {self}")
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The answer for an action or route the requested microversion does not have: a bare 404,
/// so it looks as if it were not implemented at all.
pub fn not_found() -> Error {
    Error::new(
        ErrorKind::VersionNotFound,
        "not available in this microversion",
    )
}

/// A decimal number without sign or leading zero (`0` itself is fine).
fn is_version_number(text: &str) -> bool {
    let all_digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    all_digits && (text == "0" || !text.starts_with('0'))
}

#[cfg(test)]
mod tests {
    use hyper::header::HeaderValue;

    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(HEADER, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn missing_header_means_oldest_version() {
        assert_eq!(
            ApiVersion::from_headers(&HeaderMap::new()),
            Ok(ApiVersion::MIN)
        );
    }

    #[test]
    fn latest_means_newest_version() {
        let version = ApiVersion::from_headers(&headers(&["volume latest"])).unwrap();
        assert_eq!(version, ApiVersion::new(3, 71));
        assert_eq!(version.header_value(), "volume 3.71");
    }

    #[test]
    fn versions_in_range_are_accepted() {
        for (text, minor) in [("3.0", 0), ("3.27", 27), ("3.68", 68), ("3.71", 71)] {
            assert_eq!(
                ApiVersion::parse(text),
                Ok(ApiVersion::new(3, minor)),
                "{text}"
            );
        }
    }

    #[test]
    fn versions_out_of_range_are_not_acceptable() {
        for text in [
            "2.0",
            "3.72",
            "4.0",
            "3.99999999999999999999",
            "99999999999.1",
        ] {
            let err = ApiVersion::parse(text).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::NotAcceptable, "{text}");
            assert_eq!(err.status(), 406);
        }
    }

    #[test]
    fn malformed_versions_are_bad_requests() {
        for text in [
            "", "3", "3.", ".5", "3.68.1", "03.68", "3.068", "0.5", "v3.68", "3.x",
        ] {
            let err = ApiVersion::parse(text).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{text:?}");
        }
        for text in ["-3.68", "+3.68", "3.6 8", "LATEST", "3,68"] {
            assert_eq!(
                ApiVersion::parse(text).unwrap_err().status(),
                400,
                "{text:?}"
            );
        }
    }

    #[test]
    fn header_entries_of_other_services_are_ignored() {
        let map = headers(&["compute 2.90, Volume 3.68"]);
        assert_eq!(ApiVersion::from_headers(&map), Ok(ApiVersion::REIMAGE));

        let map = headers(&["compute 2.90", "volume 3.44"]);
        assert_eq!(
            ApiVersion::from_headers(&map),
            Ok(ApiVersion::ATTACHMENT_COMPLETE)
        );

        let map = headers(&["compute 2.90"]);
        assert_eq!(ApiVersion::from_headers(&map), Ok(ApiVersion::MIN));
    }

    #[test]
    fn header_with_volume_but_no_version_is_malformed() {
        let err = ApiVersion::from_headers(&headers(&["volume"])).unwrap_err();
        assert_eq!(err.status(), 400);
        let err = ApiVersion::from_headers(&headers(&["volume 3.68 extra"])).unwrap_err();
        assert_eq!(err.status(), 400);
    }

    #[test]
    fn non_ascii_header_is_malformed() {
        let mut map = HeaderMap::new();
        map.insert(HEADER, HeaderValue::from_bytes(b"volume 3.\xff").unwrap());
        assert_eq!(ApiVersion::from_headers(&map).unwrap_err().status(), 400);
    }

    #[test]
    fn feature_gates_compare_by_minor_number() {
        assert!(ApiVersion::new(3, 68).has(ApiVersion::REIMAGE));
        assert!(!ApiVersion::new(3, 67).has(ApiVersion::REIMAGE));
        assert!(ApiVersion::new(3, 27).has(ApiVersion::ATTACHMENTS));
        assert!(!ApiVersion::new(3, 9).has(ApiVersion::ATTACHMENTS));
    }
}
