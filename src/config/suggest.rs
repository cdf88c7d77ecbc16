//! "did you mean `connect_timeout`?" for a misspelt key.

/// The known key closest to `typo`, if it is close enough to be what was meant.
pub fn closest<'a>(typo: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let typo_l = typo.to_ascii_lowercase().replace('-', "_");
    // Allow about one edit in three characters: "wieght" (2 edits, 6 characters) is meant as
    // "weight", while "io" is not a misspelling of "name".
    let limit = (typo.chars().count() / 3).max(1);
    known
        .map(|k| (distance(&typo_l, k), k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Edit distance counting insertions, deletions, substitutions and swaps of two neighbouring
/// characters as one edit each (typing errors are mostly these four).
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Keys are short; a long typo cannot be close to any of them.
    if a.len().abs_diff(b.len()) > 3 || a.len() > 64 {
        return usize::MAX;
    }
    // rows[i][j] = distance between a[..i] and b[..j].
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[&str] = &[
        "name",
        "address",
        "weight",
        "connect_timeout",
        "idle_timeout",
    ];

    #[test]
    fn close_typos_get_a_suggestion() {
        let k = || KEYS.iter().copied();
        assert_eq!(closest("wieght", k()), Some("weight"));
        assert_eq!(closest("conect_timeout", k()), Some("connect_timeout"));
        assert_eq!(closest("connect-timeout", k()), Some("connect_timeout"));
        assert_eq!(closest("Address", k()), Some("address"));
        assert_eq!(closest("nmae", k()), Some("name"));
    }

    #[test]
    fn unrelated_words_get_none() {
        let k = || KEYS.iter().copied();
        assert_eq!(closest("io", k()), None);
        assert_eq!(closest("colour", k()), None);
        assert_eq!(closest(&"x".repeat(10_000), k()), None);
    }
}
