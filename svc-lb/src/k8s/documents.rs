//! Splitting a manifest file into documents and parsing each into a generic value, so that one
//! malformed document does not hide the others.

use serde_json::Value;

/// One parsed document of a manifest file.
#[derive(Debug)]
pub(crate) struct Document {
    /// 1-based, counting only documents with content.
    pub index: usize,
    /// 1-based line of the file where the document starts.
    pub line: usize,
    pub value: Result<Value, String>,
}

/// Splits YAML text the way kubectl does (k8s.io/apimachinery `YAMLReader`): a line that is
/// `---` followed only by whitespace starts a new document. Splitting on the text rather than
/// with the YAML parser keeps a syntax error confined to its own document.
pub(crate) fn yaml_documents(text: &str) -> Vec<Document> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start_line = 1;
    let flush = |body: &str, start: usize, docs: &mut Vec<Document>| {
        if !has_content(body) {
            return;
        }
        let value = serde_yaml::from_str::<Value>(body).map_err(|e| match e.location() {
            // Report lines of the file, not of the document.
            Some(loc) => format!("line {}: {}", start + loc.line() - 1, strip_location(&e)),
            None => e.to_string(),
        });
        docs.push(Document {
            index: docs.len() + 1,
            line: start,
            value,
        });
    };
    for (i, line) in text.lines().enumerate() {
        if let Some(rest) = line.strip_prefix("---")
            && rest.trim().is_empty()
        {
            flush(&current, start_line, &mut docs);
            current.clear();
            start_line = i + 2;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    flush(&current, start_line, &mut docs);
    docs
}

/// Parses a JSON file: one value (an object or a `List`), or several concatenated ones as
/// `kubectl get -o json --watch` writes them. A syntax error ends the file (JSON has no
/// separator to resynchronise on).
pub(crate) fn json_documents(text: &str) -> Vec<Document> {
    let mut docs = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    loop {
        let offset = stream.byte_offset();
        let Some(next) = stream.next() else { break };
        let line = line_of(text, offset);
        let failed = next.is_err();
        docs.push(Document {
            index: docs.len() + 1,
            line,
            value: next.map_err(|e| e.to_string()),
        });
        if failed {
            break;
        }
    }
    docs
}

/// Whether a YAML document has anything but blank lines and comments.
fn has_content(body: &str) -> bool {
    body.lines().any(|l| {
        let l = l.trim();
        !l.is_empty() && !l.starts_with('#') && l != "..."
    })
}

/// serde_yaml appends " at line X column Y" relative to the document; we print file lines.
fn strip_location(e: &serde_yaml::Error) -> String {
    let msg = e.to_string();
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    // The stream's offset is where the previous value ended; the next starts after whitespace.
    let rest = &text[offset..];
    let skipped = rest.len() - rest.trim_start().len();
    text[..offset + skipped].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_split_on_separator_lines_only() {
        let text = "---\n# comment only\n---\na: 1\n---   \nb: '---'\nc: |\n  ---\n";
        let docs = yaml_documents(text);
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].index, 1);
        assert_eq!(docs[0].line, 4);
        assert_eq!(docs[0].value.as_ref().unwrap()["a"], 1);
        assert_eq!(docs[1].line, 6);
        assert_eq!(docs[1].value.as_ref().unwrap()["c"], "---\n");
    }

    #[test]
    fn yaml_syntax_error_stays_in_its_document() {
        let text = "a: 1\n---\nb: [1, 2\nc: 3\n---\nd: 4\n";
        let docs = yaml_documents(text);
        assert_eq!(docs.len(), 3);
        assert!(docs[0].value.is_ok());
        let err = docs[1].value.as_ref().unwrap_err();
        assert!(
            err.starts_with("line 4:") || err.starts_with("line 3:"),
            "{err}"
        );
        assert_eq!(docs[2].value.as_ref().unwrap()["d"], 4);
    }

    #[test]
    fn json_stream() {
        let text = "{\"a\": 1}\n\n{\"b\": 2}\n{\"c\": ";
        let docs = json_documents(text);
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[1].line, 3);
        assert_eq!(docs[1].value.as_ref().unwrap()["b"], 2);
        assert!(docs[2].value.is_err());
    }
}
