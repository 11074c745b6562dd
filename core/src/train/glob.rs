//! Parameter-name globs for `param_groups`: `*` matches any run of characters (dots
//! included), everything else matches itself.

pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Greedy matching with back-tracking to the last `*`: linear for the patterns people write.
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("default.tokens", "default.tokens"));
        assert!(!glob_match("default.tokens", "default.tokens2"));
        assert!(glob_match("*.tokens", "default.tokens"));
        assert!(glob_match("*", ""));
        assert!(glob_match("time*", "time_table"));
        assert!(glob_match("a*b*c", "a_x_b_y_c"));
        assert!(!glob_match("a*b*c", "a_x_c_y_b"));
        assert!(glob_match("*attn*weight", "blocks.0.attn.to_q.weight"));
        assert!(!glob_match("*attn*bias", "blocks.0.attn.to_q.weight"));
    }
}
