//! Plain aligned text tables for people. Programs use `--json`.

#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// A cell holds one line: a newline or an escape sequence in a value
    /// (a server's message, a name from elsewhere) would break the columns.
    pub fn row(&mut self, cells: Vec<String>) {
        let one = |c: String| if c.chars().any(char::is_control) { pgfleet_proto::one_line(&c, 100_000) } else { c };
        self.rows.push(cells.into_iter().map(one).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut width: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut s = String::new();
            for (i, c) in cells.enumerate().take(cols) {
                if i + 1 == cols {
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    s.extend(std::iter::repeat_n(' ', width[i] - c.chars().count() + 2));
                }
            }
            s.trim_end().to_owned()
        };
        let mut out = line(&mut self.headers.iter().copied());
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(&mut r.iter().map(String::as_str)));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&["A", "BB", "C"]);
        t.row(vec!["long".into(), "x".into(), "end".into()]);
        assert_eq!(t.render(), "A     BB  C\nlong  x   end\n");
    }

    #[test]
    fn a_cell_is_one_line() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["could not connect\nDETAIL: x".into(), "\u{1b}[2J".into()]);
        let out = t.render();
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(out.contains("could not connect / DETAIL: x") && !out.contains('\u{1b}'), "{out}");
    }
}
