//! The one error type that crosses the daemon's boundaries.
//!
//! Every refusal carries a [`ErrorKind`] and a sentence for humans. The kind decides the HTTP
//! status and fault name on the socket ([`Error::status`], [`Error::fault_name`]) and the errno
//! on the FUSE side ([`Error::errno`]); nothing else maps errors, so the two front ends cannot
//! drift apart.

use std::fmt;

/// What went wrong, in the terms a client can act on.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum ErrorKind {
    /// Malformed or invalid input (400, `EINVAL`).
    InvalidInput,
    /// The resource is in a status that does not allow the request (400, `EBUSY`).
    InvalidStatus,
    /// The image does not fit the volume (400, `EFBIG`).
    TooLarge,
    /// Denied by policy (403, `EACCES`).
    Forbidden,
    /// No such volume, image or attachment, or not visible to the caller (404, `ENOENT`).
    NotFound,
    /// The API microversion does not know the action: a bare 404, as Cinder answers.
    VersionNotFound,
    /// The request conflicts with the resource's current state (409, `EBUSY`).
    Conflict,
    /// The requested API microversion is outside the supported range (406).
    NotAcceptable,
    /// The request body is larger than allowed (413, `EFBIG`).
    PayloadTooLarge,
    /// The backing store has no space left (413, `ENOSPC`).
    NoSpace,
    /// The request body has a content type the route does not take (415).
    UnsupportedMediaType,
    /// The route exists but not with this method (405).
    MethodNotAllowed,
    /// The daemon failed for a reason of its own (500, `EIO`).
    Internal,
    /// A bounded resource is in use by others; trying again later may work (503, `EAGAIN`).
    Unavailable,
}

/// A refusal or failure with a message meant for the person who sent the request.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with a human-readable `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Shorthand for [`ErrorKind::InvalidInput`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// Shorthand for [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// Shorthand for [`ErrorKind::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// Wraps an I/O error met while doing `what`; ENOSPC keeps its own kind.
    pub fn io(what: &str, err: &std::io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            _ => ErrorKind::Internal,
        };
        Self::new(kind, format!("{what}: {err}"))
    }

    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The HTTP status code for the socket API.
    pub fn status(&self) -> u16 {
        match self.kind {
            ErrorKind::InvalidInput | ErrorKind::InvalidStatus | ErrorKind::TooLarge => 400,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound | ErrorKind::VersionNotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::NotAcceptable => 406,
            ErrorKind::Conflict => 409,
            ErrorKind::PayloadTooLarge | ErrorKind::NoSpace => 413,
            ErrorKind::UnsupportedMediaType => 415,
            ErrorKind::Internal => 500,
            ErrorKind::Unavailable => 503,
        }
    }

    /// The fault name of the OpenStack error body (`{"badRequest": {...}}`).
    pub fn fault_name(&self) -> &'static str {
        fault_name_for_status(self.status())
    }

    /// The errno a FUSE writer of the control file receives.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::InvalidInput
            | ErrorKind::NotAcceptable
            | ErrorKind::UnsupportedMediaType
            | ErrorKind::MethodNotAllowed => libc::EINVAL,
            ErrorKind::InvalidStatus | ErrorKind::Conflict => libc::EBUSY,
            ErrorKind::TooLarge | ErrorKind::PayloadTooLarge => libc::EFBIG,
            ErrorKind::Forbidden => libc::EACCES,
            ErrorKind::NotFound | ErrorKind::VersionNotFound => libc::ENOENT,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Internal => libc::EIO,
            ErrorKind::Unavailable => libc::EAGAIN,
        }
    }
}

/// The fault name the API gives an error `status`.
pub fn fault_name_for_status(status: u16) -> &'static str {
    match status {
        400 => "badRequest",
        403 => "forbidden",
        404 => "itemNotFound",
        405 => "badMethod",
        406 => "notAcceptable",
        409 => "conflictingRequest",
        413 => "overLimit",
        503 => "serviceUnavailable",
        415 => "badMediaType",
        _ => "computeFault",
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}
