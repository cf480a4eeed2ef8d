//! A table's row checksum as manifests and forgotten-tenant records store it (computed by
//! `catalog::rowsum`, docs/FORMAT.md §5.4).

use serde::{Deserialize, Serialize};

/// One table's checksum: the row count and the sum of the rows' truncated SHA-256.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSum {
    pub rows: u64,
    /// 32 hex digits: the sum of the rows' truncated SHA-256, modulo 2^128.
    pub sum: String,
}

impl TableSum {
    /// The checksum of this table's rows and `part`'s; `None` when a sum does not parse.
    pub fn plus(&self, part: &TableSum) -> Option<TableSum> {
        let a = u128::from_str_radix(&self.sum, 16).ok()?;
        let b = u128::from_str_radix(&part.sum, 16).ok()?;
        Some(TableSum {
            rows: self.rows + part.rows,
            sum: format!("{:032x}", a.wrapping_add(b)),
        })
    }

    /// The checksum of this table's rows without `part`'s (the sum is additive, so a part's
    /// rows come out exactly); `None` when either sum does not parse or `part` is larger.
    pub fn minus(&self, part: &TableSum) -> Option<TableSum> {
        let whole = u128::from_str_radix(&self.sum, 16).ok()?;
        let less = u128::from_str_radix(&part.sum, 16).ok()?;
        Some(TableSum {
            rows: self.rows.checked_sub(part.rows)?,
            sum: format!("{:032x}", whole.wrapping_sub(less)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_subtracts_exactly() {
        let whole = TableSum {
            rows: 3,
            sum: format!("{:032x}", 5u128),
        };
        let part = TableSum {
            rows: 1,
            sum: format!("{:032x}", 7u128),
        };
        let rest = whole.minus(&part).unwrap();
        assert_eq!(rest.rows, 2);
        assert_eq!(
            u128::from_str_radix(&rest.sum, 16).unwrap(),
            5u128.wrapping_sub(7)
        );
        assert!(part.minus(&whole).is_none(), "more rows than the whole");
        assert_eq!(rest.plus(&part).unwrap(), whole);
    }
}
