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

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
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
}
