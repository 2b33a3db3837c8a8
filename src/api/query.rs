//! Query parameter values that need more than a type to check, refused with
//! 400 naming the parameter and what it accepts.

use super::error::ApiError;

/// A `limit` parameter: `default` when absent, else an integer in `1..=max`.
pub(super) fn limit(text: Option<&str>, default: u32, max: u32) -> Result<u32, ApiError> {
    let Some(text) = text else {
        return Ok(default);
    };
    match text.trim().parse::<u32>() {
        Ok(limit) if (1..=max).contains(&limit) => Ok(limit),
        _ => Err(ApiError::BadRequest(format!(
            "query parameter limit: '{text}' is not an integer from 1 to {max}"
        ))),
    }
}

/// A parameter holding one of an enumeration's text values.
pub(super) fn one_of<T: std::str::FromStr>(
    parameter: &str,
    text: &str,
    accepted: &[&str],
) -> Result<T, ApiError> {
    text.parse().map_err(|_| {
        ApiError::BadRequest(format!(
            "query parameter {parameter}: '{text}' is not one of {}",
            accepted.join(", ")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_default_and_stay_in_range() {
        assert_eq!(limit(None, 10, 100).unwrap(), 10);
        assert_eq!(limit(Some("1"), 10, 100).unwrap(), 1);
        assert_eq!(limit(Some("100"), 10, 100).unwrap(), 100);
        for bad in ["0", "101", "-1", "ten", "", "1.5"] {
            let message = limit(Some(bad), 10, 100).unwrap_err().to_string();
            assert!(
                message.contains("limit") && message.contains("1 to 100"),
                "{bad}: {message}"
            );
        }
    }
}
