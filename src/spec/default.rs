//! Constant defaults for serde fields, so that a field says its default
//! where it is declared:
//!
//! ```ignore
//! #[serde(default = "crate::spec::default::u32::<3>")]
//! runs: u32,
//! ```
//!
//! serde's `default = "path"` takes a function; these are one function per
//! integer type, with the value as a const parameter. Defaults that are
//! text or floats cannot be const parameters and keep a function of their
//! own beside the field's struct.

pub fn u16<const N: u16>() -> u16 {
    N
}

pub fn u32<const N: u32>() -> u32 {
    N
}

pub fn u64<const N: u64>() -> u64 {
    N
}

pub fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Params {
        #[serde(default = "super::u16::<8090>")]
        port: u16,
        #[serde(default = "super::u32::<3>")]
        runs: u32,
        #[serde(default = "super::u64::<90>")]
        catch_up_s: u64,
        #[serde(default = "super::yes")]
        sign: bool,
    }

    #[test]
    fn a_missing_field_takes_its_constant_and_a_given_one_wins() {
        let p: Params = toml::from_str("runs = 5").unwrap();
        assert_eq!((p.port, p.runs, p.catch_up_s, p.sign), (8090, 5, 90, true));
    }
}
